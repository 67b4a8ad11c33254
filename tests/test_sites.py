"""The sites inside a sublayer (issue 29) through the whole job: each hook stored at its own width
(mlp_in d_model, z n_heads * d_head, mlp_post d_mlp), equal to a direct forward, described in the
manifest (widths, z's head layout, normalisation by the width), its bytes predicted exactly by
`preview --stats`, and read back paired."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import transformers

from beam_extract import preview
from beam_extract.hooks import hook_name
from hf_reference import COMMON

SITES = ("mlp_in", "mlp_out", "z", "mlp_post")


@pytest.mark.slow
def test_a_run_of_inner_sites_writes_each_at_its_width_and_preview_predicts_its_bytes(tmp_path, capsys):
    from beam_extract.model.embedded import write_random_checkpoint
    from beam_extract.model.loaded import load_model
    from beam_extract.options import sample_input
    from beam_extract.pipeline import run
    from beam_extract.readers.reader import read_activations, token_batches

    # Heads of 24: z (4 x 24 = 96) is neither d_model (64) nor d_mlp (160) wide.
    config = transformers.Qwen2Config(**{**COMMON, "head_dim": 24, "vocab_size": 151936, "bos_token_id": 151643,
                                         "eos_token_id": 151645})
    write_random_checkpoint(tmp_path / "model", config, seed=1)
    lines = (Path(sample_input()).parent / "sample_text.jsonl").read_text().splitlines()[:3]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    args = [f"--input={tmp_path / 'docs.jsonl'}", f"--model={tmp_path / 'model'}", "--max_seq_len=128",
            "--buckets=128", "--layers=0,2", "--exclude_special_tokens=false", "--output_dtype=bfloat16"]
    predicted = {}
    for sites in (*SITES, ",".join(SITES)):
        preview.main([*args, f"--sites={sites}", "--stats", "--num", "0"])
        predicted[sites] = int(re.search(r"in all \(([\d,]+) bytes\)", capsys.readouterr().out).group(1).replace(",", ""))
    run([*args, f"--sites={','.join(SITES)}", f"--output={tmp_path / 'out'}"])

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    widths = {"mlp_in": 64, "mlp_out": 64, "z": 96, "mlp_post": 160}
    assert manifest["z_head_layout"] == {"n_heads": 4, "d_head": 24, "column": "head * d_head + i", "shape": [4, 24]}
    assert sorted(manifest["hooks"]) == sorted(hook_name(layer, site) for layer in (0, 2) for site in SITES)
    for site in SITES:
        written = sum(f.stat().st_size for f in (out / site).glob("layer_*/*.tfrecord"))
        assert written == predicted[site], site
    assert sum(f.stat().st_size for f in out.glob("*/layer_*/*.tfrecord")) == predicted[",".join(SITES)]

    model = load_model(str(tmp_path / "model"))
    for name, summary in manifest["hooks"].items():
        width = widths[summary["site"]]
        norm = summary["normalisation"]
        assert summary["width"] == width
        assert norm["saelens_scaling_factor"] == pytest.approx(width ** 0.5 / norm["mean_l2_norm"])
        records = list(read_activations(str(out), name))
        assert len(records) == manifest["counts"]["samples"] > 0
        rows = np.zeros((len(records), 128), np.int32)
        for row, record in zip(rows, records):
            row[:len(record["sequence_token_ids"])] = record["sequence_token_ids"]
        direct = model.run_with_cache(rows, [name])[name]
        for row, record in zip(direct, records):
            assert record["d_model"] == width and record["activations"].shape[1] == width
            want = row[record["positions"]]
            np.testing.assert_allclose(record["activations"], want, rtol=1e-2, atol=1e-2 * np.abs(want).max())

    # A transcoder's pairs from the run: every stored token once, its mlp_in and mlp_out rows together.
    pairs = [hook_name(2, "mlp_in"), hook_name(2, "mlp_out")]
    batches = list(token_batches(str(out), hooks=pairs, batch_tokens=1, shuffle_buffer=64))
    tokens = {tuple(r) for r in np.concatenate([r["activations"] for r in read_activations(str(out), pairs[0])])}
    assert len(batches) == manifest["hooks"][pairs[0]]["tokens"] and {tuple(b[0][0]) for b in batches} == tokens
    by_input = {tuple(b[0][0]): tuple(b[1][0]) for b in batches}
    for first, second in zip(read_activations(str(out), pairs[0]), read_activations(str(out), pairs[1])):
        assert all(by_input[tuple(a)] == tuple(b) for a, b in zip(first["activations"], second["activations"]))
