"""Static-shape batches: buckets, packing, and packed rows that equal unpacked runs."""

import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_extract.batching import (BatchDoFn, BatchKeyedSamples, BatchPlan, assemble, bucket_length, form_batches, pack_rows,
                                   parse_buckets, row_counts)
from beam_extract.extract import extract_batch
from beam_extract.format.schema import decode_record
from beam_extract.model.loaded import load_model
from beam_extract.options import UsageError, parse_layers, parse_sites
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
    for bad in ("multiples:x", "a,b", "0,5", "geometric:x", "geometric:1", "geometric:2.5", "geometric:nan"):
        with pytest.raises(ValueError, match="--buckets"):
            parse_buckets(bad, 100)


def test_geometric_buckets_step_by_a_ratio_within_each_power_of_two():
    assert parse_buckets("geometric:1.5", 8192) == (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
                                                    3072, 4096, 6144, 8192)
    assert parse_buckets("geometric:2", 1000) == (32, 64, 128, 256, 512, 1000)
    assert parse_buckets("geometric:1.41", 4096) == (32, 64, 96, 128, 192, 256, 384, 512, 736, 1024, 1472, 2048,
                                                     2912, 4096)
    fine = parse_buckets("geometric:1.19", 1 << 20)
    assert all(b % 32 == 0 for b in fine) and len(fine) < 70
    assert all(later / earlier <= 1.19 + 32 / earlier for earlier, later in zip(fine[4:], fine[5:]))


def test_row_counts_are_the_rows_and_the_powers_of_two_below():
    assert row_counts(8) == (1, 2, 4, 8) and row_counts(6) == (1, 2, 4, 6) and row_counts(1) == (1,)
    assert all(len(row_counts(n)) <= math.ceil(math.log2(n)) + 1 for n in range(1, 300))  # extra: ceil(log2 n)


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
    padded = batch.pad_rows(4)
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


def test_long_packed_rows_skip_no_visible_tile():
    """Rows of several 128-token tiles, documents starting mid-tile: each query block's loop over
    keys starts at its segment, and the activations still equal each document run alone."""
    model = load_model("tiny-random-qwen2")
    hooks = ((model.config.num_layers - 1, "resid_post"),)
    samples = [sample(n, f"doc{n}") for n in (130, 300, 77, 411, 260, 5, 129, 200)]
    [batch], _ = form_batches(samples, 1000, rows_per_batch=2, pack=True, final=True)
    assert all(len({p.row for p in batch.placements if p.row == r}) for r in range(2))
    activations, norms = model.dispatch(batch.tokens, batch.positions, batch.segment_ids, hooks).fetch()
    for placement in batch.placements:
        n = len(placement.sample.token_ids)
        alone = model.run_with_cache(placement.sample.token_ids[None], ["blocks.3.hook_resid_post"])
        got = activations[hooks[0]][placement.row, placement.start:placement.start + n]
        want = alone["blocks.3.hook_resid_post"][0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1, np.abs(want).max()))


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


def text(n, name):
    return sample(n, name)


def shapes(batches):
    return sorted(b.tokens.shape for b in batches)


def test_a_small_job_gets_the_smallest_shapes():
    """The default job's text: six short documents once filled an 8x8192 batch."""
    plan = BatchPlan(parse_buckets("geometric:1.5", 8192), 8, 0, "text", 8192)
    docs = [text(n, f"doc{i}") for i, n in enumerate((29, 32, 45, 48, 51, 408))]
    [batch] = plan.batch_all(docs)
    assert batch.tokens.shape == (1, 768) and batch.real_tokens == 613
    # Rows: the fewest power of two; an unpacked key's length is its bucket.
    arc = [sample(300, f"t{i}", task_id="t") for i in range(3)]
    assert shapes(plan.batch_all(arc)) == [(4, 384)]
    # Packed rows of a key that never filled a batch: the bucket of the fullest row.
    docs = [text(n, f"d{i}") for i, n in enumerate((8000, 7000, 3000, 100))]
    assert shapes(plan.batch_all(docs)) == [(4, 8192)]
    assert shapes(BatchPlan(parse_buckets("geometric:1.5", 8192), 8, 0, "text", 4096).batch_all(
        [text(n, f"e{i}") for i, n in enumerate((1000, 900))])) == [(1, 2048)]
    # With --tokens_per_batch a shorter row has more rows: the last batch takes that length's counts.
    plan = BatchPlan(parse_buckets("geometric:1.5", 8192), 8, 65536, "text", 8192)
    assert plan.rows(6144) == 10 and shapes(plan.batch_all([text(5000, f"f{i}") for i in range(5)])) == [(8, 6144)]
    assert shapes(plan.batch_all([text(100, "g")])) == [(1, 128)]


def test_a_key_that_filled_a_batch_keeps_its_shape_for_the_last():
    """Its full shape is compiled already: a smaller last batch would only add a compilation."""
    plan = BatchPlan((16, 32), 4, 0, "off", 32)
    samples = [sample(10, f"s{i}") for i in range(6)]
    assert shapes(plan.batch_all(samples)) == [(4, 16), (4, 16)]
    assert shapes(plan.batch_all(samples, shrink="always")) == [(2, 16), (4, 16)]
    assert shapes(plan.batch_all(samples[:2])) == [(2, 16)]
    assert shapes(plan.batch_all(samples[:2], shrink="never")) == [(4, 16)]
    # Packed: the final emission fills a batch and leaves a tail; the tail keeps the full shape.
    plan = BatchPlan((16, 32), 2, 0, "text", 32)
    docs = [text(n, f"p{i}") for i, n in enumerate((30, 30, 20, 5))]
    assert shapes(plan.batch_all(docs)) == [(2, 32), (2, 32)]
    assert shapes(plan.batch_all(docs, shrink="always")) == [(1, 32), (2, 32)]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=60),
       batch_size=st.integers(1, 9), tokens_per_batch=st.sampled_from([0, 256, 1000]),
       packing=st.sampled_from(["text", "all", "off"]), pack_length=st.sampled_from([64, 200, 300]),
       spec=st.sampled_from(["geometric:1.5", "pow2", "multiples:50", "40,90"]),
       shrink=st.sampled_from(["unfilled", "always", "never"]))
def test_every_sample_once_in_few_shapes_and_segments_apart(lengths, batch_size, tokens_per_batch, packing,
                                                              pack_length, spec, shrink):
    plan = BatchPlan(parse_buckets(spec, 300), batch_size, tokens_per_batch, packing, pack_length)
    samples = [sample(n, f"x{i:03d}", task_id="t" if is_arc else "", seed=i) for i, (n, is_arc) in enumerate(lengths)]
    batches = plan.batch_all(samples, shrink)
    placed = [p.sample.sample_id for b in batches for p in b.placements]
    assert sorted(placed) == sorted(s.sample_id for s in samples)  # each sample exactly once
    lengths_used = set(plan.buckets) | {pack_length}
    for batch in batches:
        rows, length = batch.tokens.shape
        assert length in lengths_used and rows in row_counts(plan.rows(length))
        for p in batch.placements:  # its own segment, positions from 0, nothing else in its span
            n = len(p.sample.token_ids)
            span = slice(p.start, p.start + n)
            np.testing.assert_array_equal(batch.tokens[p.row, span], p.sample.token_ids)
            np.testing.assert_array_equal(batch.positions[p.row, span], np.arange(n))
            segment = batch.segment_ids[p.row, p.start]
            assert segment > 0 and (batch.segment_ids[p.row, span] == segment).all()
            assert (batch.segment_ids[p.row] == segment).sum() == n
        assert batch.real_tokens == sum(len(p.sample.token_ids) for p in batch.placements)
    per_length = {}
    for batch in batches:
        per_length.setdefault(batch.tokens.shape[1], set()).add(batch.tokens.shape[0])
    assert all(len(rows) <= math.ceil(math.log2(plan.rows(length))) + 1 for length, rows in per_length.items())
    again = plan.batch_all(samples, shrink)  # deterministic for a given input order
    assert [(b.tokens.shape, [(p.sample.sample_id, p.row, p.start) for p in b.placements]) for b in again] == \
        [(b.tokens.shape, [(p.sample.sample_id, p.row, p.start) for p in b.placements]) for b in batches]


def test_batch_dofn_shapes_equal_the_in_memory_batching():
    """BatchDoFn in a pipeline (state: whether a key filled a batch) against BatchPlan.batch_all."""
    plan = BatchPlan(parse_buckets("geometric:1.5", 512), 4, 0, "text", 512)
    samples = ([sample(300, f"a{i}", task_id="t") for i in range(6)]  # fills a batch: 4 + 4 rows
               + [sample(100, f"b{i}", task_id="t") for i in range(3)]  # never fills: 4 rows of 128
               + [sample(90, "c0", task_id="t")]  # alone: 1 row
               + [text(n, f"d{i}") for i, n in enumerate((50, 60, 70))])  # packed into one row of 192
    expected = shapes(plan.batch_all(samples))
    assert expected == [(1, 96), (1, 192), (4, 128), (4, 384), (4, 384)]
    with beam.Pipeline() as pipeline:
        got = (pipeline
               | beam.Create(samples)
               | beam.Map(lambda s: ((*plan.key(s), "one shard"), s))
               | beam.ParDo(BatchDoFn(plan))
               | beam.Map(lambda batch: batch.tokens.shape))
        assert_that(got, equal_to(expected))


def test_the_end_of_input_rests_of_many_keys_make_at_most_one_partial_batch_per_shape():
    """Keys per producing thread: each key's rest at the end of the input is gathered by shape, so
    the partial batches do not grow with the keys (16 here; 768 on 64 workers x 12 threads)."""
    plan = BatchPlan((16, 32), 4, 0, "off", 32)
    keyed = [((16, False, f"thread{k}"), sample(10, f"a{k}-{i}")) for k in range(16) for i in range(5)]
    keyed.append(((16, False, "thread0"), sample(10, "a0-5")))
    keyed += [((32, False, f"thread{k}"), sample(20, f"b{k}")) for k in range(2)]  # never fills a batch
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        got = (pipeline
               | beam.Create(keyed)
               | BatchKeyedSamples(plan)
               | beam.Map(lambda batch: (batch.tokens.shape, len({p.row for p in batch.placements}))))
        # 16 full batches from the keys, 4 from their 17 rests, and the one left over keeps the full
        # shape (it ran); the other shape's two samples share the smallest shape.
        assert_that(got, equal_to([((4, 16), 4)] * 20 + [((4, 16), 1), ((2, 32), 2)]))
