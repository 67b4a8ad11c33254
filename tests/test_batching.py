"""Static-shape batches: buckets, packing, and packed rows that equal unpacked runs."""

import numpy as np
import pytest

from beam_extract.batching import (BatchPlan, assemble, bucket_length, form_batches, pack_rows, parse_buckets)
from beam_extract.extract import extract_batch, pad_rows
from beam_extract.model import load_model
from beam_extract.options import UsageError, parse_layers, parse_sites
from beam_extract.output.schema import decode_record
from beam_extract.tokenize import Sample
from hf_reference import random_hf_checkpoint


def sample(n, name="s", task_id="", seed=0):
    ids = np.random.default_rng(seed + n).integers(1, 500, n).astype(np.int32)
    return Sample(name, ids, "in.jsonl", 1, task_id=task_id)


def test_buckets():
    assert parse_buckets("multiples:128", 1000) == (128, 256, 384, 512, 640, 768, 896, 1000)
    assert parse_buckets("pow2", 1000) == (16, 32, 64, 128, 256, 512, 1000)
    assert parse_buckets("300,100", 8192) == (100, 300, 8192)
    assert [bucket_length(n, (128, 256, 300)) for n in (1, 128, 129, 300)] == [128, 128, 256, 300]
    with pytest.raises(ValueError):
        bucket_length(301, (128, 256, 300))
    for bad in ("multiples:x", "a,b", "0,5"):
        with pytest.raises(ValueError, match="--buckets"):
            parse_buckets(bad, 100)


def test_pack_rows_first_fit_decreasing():
    samples = [sample(n, f"s{n}") for n in (5, 7, 3, 2, 6)]
    rows = pack_rows(samples, 10)
    assert [[s.sample_id for s in row] for row in rows] == [["s7", "s3"], ["s6", "s2"], ["s5"]]
    with pytest.raises(ValueError):
        pack_rows([sample(11)], 10)


def test_assemble_restarts_positions_and_numbers_segments():
    a, b = sample(3, "a"), sample(4, "b")
    batch = assemble([[a, b], [sample(2, "c")]], n_rows=3, row_length=8)
    assert batch.tokens.shape == (3, 8) and batch.tokens.dtype == np.int32
    np.testing.assert_array_equal(batch.segment_ids[0], [1, 1, 1, 2, 2, 2, 2, 0])
    np.testing.assert_array_equal(batch.positions[0], [0, 1, 2, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(batch.tokens[0, 3:7], b.token_ids)
    assert batch.segment_ids[2].sum() == 0 and batch.real_tokens == 9
    assert [(p.sample.sample_id, p.row, p.start) for p in batch.placements] == [("a", 0, 0), ("b", 0, 3), ("c", 1, 0)]
    padded = pad_rows(batch, 4)
    assert padded.tokens.shape == (4, 8) and padded.segment_ids[3].sum() == 0


def test_form_batches_keeps_the_least_filled_rows_for_later():
    samples = [sample(n, f"s{i}") for i, n in enumerate([9, 9, 8, 2, 7, 1])]
    batches, leftover = form_batches(samples, 10, rows_per_batch=2, pack=True, final=False)
    assert len(batches) == 2 and [s.sample_id for s in leftover] == []  # 4 rows, all full enough
    samples = [sample(n, f"t{i}") for i, n in enumerate([9, 9, 8, 7, 6])]  # nothing fits together
    batches, leftover = form_batches(samples, 10, rows_per_batch=2, pack=True, final=False)
    assert len(batches) == 2 and [s.sample_id for s in leftover] == ["t4"]
    batches, leftover = form_batches(samples, 10, rows_per_batch=2, pack=True, final=True)
    assert len(batches) == 3 and not leftover and batches[-1].segment_ids[1].sum() == 0


def test_plan_routes_text_to_packing_and_arc_to_buckets():
    plan = BatchPlan((128, 256, 512), batch_size=4, tokens_per_batch=0, packing="text", pack_length=256)
    assert plan.key(sample(100)) == (256, True)
    assert plan.key(sample(300)) == (512, False)
    assert plan.key(sample(100, task_id="t")) == (128, False)
    assert BatchPlan((128,), 4, 0, "all", 256).key(sample(100, task_id="t")) == (256, True)
    assert BatchPlan((128, 256), 4, 0, "off", 256).key(sample(100)) == (128, False)
    assert BatchPlan((128,), 4, 1024, "off", 256).rows(256) == 4 and plan.rows(512) == 4


def test_packed_rows_equal_unpacked_runs(tmp_path):
    random_hf_checkpoint(tmp_path, seed=8)
    model = load_model(str(tmp_path))
    hooks = ((0, "attn_out"), (2, "resid_post"))
    samples = [sample(n, f"doc{n}") for n in (17, 5, 30, 9, 1, 12)]
    [batch], _ = form_batches(samples, 64, rows_per_batch=2, pack=True, final=True)
    assert any(len([p for p in batch.placements if p.row == r]) > 2 for r in range(2))  # really packed
    activations, norms = model.dispatch(batch.tokens, batch.positions, batch.segment_ids, hooks).fetch()
    extracted, dead = extract_batch(activations, norms, batch, hooks, "float32")
    assert dead == []
    records = [decode_record(data) for index, (layer, site) in enumerate(hooks)
               for data in extracted.records(index, f"blocks.{layer}.hook_{site}", layer)]
    assert len(records) == len(samples) * len(hooks)
    for record in records:
        alone = model.run_with_cache(record["token_ids"][None], [record["hook_name"]])[record["hook_name"]][0]
        np.testing.assert_allclose(record["activations"], alone, rtol=0, atol=1e-5 * max(1, np.abs(alone).max()))
        np.testing.assert_array_equal(record["positions"], np.arange(record["n_tokens"]))


def test_layer_and_site_options():
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("3, 0-1", 4) == (0, 1, 3)
    for bad in ("4", "x", "2-9", "-1", "3-1", "0-1000000000000"):
        with pytest.raises(UsageError, match="--layers"):
            parse_layers(bad, 4)
    assert parse_sites("resid_post,mlp_out,resid_post") == ("resid_post", "mlp_out")
    with pytest.raises(UsageError, match="--sites"):
        parse_sites("resid,mlp_out")
