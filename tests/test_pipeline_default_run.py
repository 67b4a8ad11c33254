"""`python -m beam_extract --runner=DirectRunner` with no other flag: offline, end to end, read back
with TensorFlow, and equal to a direct call of the same model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
GUARDED_MAIN = """
import sys, emulator_auth, network_guard
from beam_extract import run_without_torch
run_without_torch()  # as `python -m beam_extract` does (beam_extract.__main__)
network_guard.install(sys.argv[1])
emulator_auth.start_anonymous_if_emulated()
from beam_extract.__main__ import main
main(sys.argv[2:])
"""


def run_guarded(args, cwd, log, **extra_env):
    """python -m beam_extract ARGS in a subprocess whose outbound connection attempts are blocked and logged."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra_env}
    return subprocess.run([sys.executable, "-c", GUARDED_MAIN, str(log), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_guard_catches_an_outbound_attempt(tmp_path):
    """The guard used below is real: a download attempt under it is blocked and logged."""
    log = tmp_path / "connections.log"
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    code = ("import sys, network_guard, urllib.request\nnetwork_guard.install(sys.argv[1])\n"
            "try:\n    urllib.request.urlopen('https://example.com/prism.zip', timeout=5)\nexcept OSError:\n    pass\n")
    subprocess.run([sys.executable, "-c", code, str(log)], env=env, check=True, timeout=60)
    assert "example.com" in log.read_text()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("default_run")
    log = workdir / "connections.log"
    result = run_guarded(["--runner=DirectRunner"], workdir, log)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir, result, log


@pytest.mark.slow
def test_default_run_makes_no_outbound_connection(default_run):
    workdir, result, log = default_run
    assert not log.exists(), log.read_text()
    assert "tokens/s" in result.stdout and "manifest" in result.stdout


@pytest.mark.slow
def test_a_local_job_reports_its_progress(default_run):
    import re

    _, result, _ = default_run
    reports = re.findall(r"^\[[\d,]+ s\] ([\d,]+) lines read \(\d+%\) · ([\d,]+) samples", result.stderr, re.M)
    assert reports, result.stderr[-3000:]
    assert all(int(a.replace(",", "")) <= int(b.replace(",", "")) for (a, _), (b, _) in zip(reports, reports[1:]))


@pytest.mark.slow
def test_manifest_describes_the_run(default_run):
    workdir, _, _ = default_run
    manifest = json.loads((workdir / "activations/manifest.json").read_text())
    assert manifest["model"]["name"] == "tiny-random-qwen2"
    assert manifest["model"]["config"]["num_layers"] == 4 and len(manifest["model"]["weights_sha256"]) == 64
    assert manifest["sites"] == ["resid_post"] and manifest["layers"] == [0, 1, 2, 3]
    assert manifest["output_dtype"] == "float32" and manifest["model"]["compute_dtype"] == "float32"
    counts = manifest["counts"]
    # The packaged samples: 4 ARC tasks (5 test inputs, 8 views each) and 6 text documents.
    assert counts["lines_read"] == 10 and counts["samples"] == 46 and counts["dead_lettered"] == 0
    for name, hook in manifest["hooks"].items():
        assert hook["records"] == 46 and hook["tokens"] > 0 and hook["mean_l2_norm"] > 0
        assert hook["files"] and all(f.startswith(f"resid_post/layer_{hook['layer']:02d}/part-") for f in hook["files"])
        on_disk = sorted(p.relative_to(workdir / "activations").as_posix()
                         for p in (workdir / "activations").glob(f"resid_post/layer_{hook['layer']:02d}/*"))
        assert on_disk == hook["files"]  # nothing but committed files (no temporaries left)
    assert counts["lines_unaccounted"] == 0 and counts["samples_committed_twice"] == 0
    batching = manifest["batching"]
    sequences = full_sequences()
    assert batching["real_tokens"] == sum(len(s) for s in sequences.values())  # every token ran, padding aside
    specials = sum(int(np.isin(s, [151643, 151644, 151645]).sum()) for s in sequences.values())
    assert manifest["hooks"]["blocks.0.hook_resid_post"]["tokens"] == batching["real_tokens"] - specials
    assert batching["compilations"] == len(batching["batch_shapes"])  # one compile per batch shape, one process
    shapes = {tuple(map(int, shape.split("x"))): n for shape, n in batching["batch_shapes"].items()}
    assert sum(shapes.values()) == batching["batches"]
    assert sum(rows * length * n for (rows, length), n in shapes.items()) == batching["computed_tokens"]
    # A small job's last batches take their smallest shapes: the six short documents once filled a
    # whole 8x8192 batch (0.18 real per computed token for the job).
    assert batching["real_over_computed"] >= 0.6, batching
    assert all(length < 8192 for _, length in shapes), batching


@pytest.mark.slow
def full_sequences() -> dict:
    """sample id -> every token of the sequence the model saw, rebuilt from the packaged input."""
    from beam_extract.arc.encoders import DEFAULT_ENCODER, parse_encoder
    from beam_extract.arc.prompt import DEFAULT_TEMPLATE, load_template
    from beam_extract.io.sources import match_paths, read_lines
    from beam_extract.model.weights import resolve_model_dir
    from beam_extract.options import sample_input
    from beam_extract.records import parse_line
    from beam_extract.records.identity import input_root
    from beam_extract.stages import expand_views
    from beam_extract.tokenize import PromptSettings, TokenSelection, load_tokenizer, to_samples

    tokenizer = load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False))
    settings = PromptSettings(load_template(DEFAULT_TEMPLATE), DEFAULT_ENCODER, parse_encoder(DEFAULT_ENCODER), False)
    sequences = {}
    for path in match_paths(sample_input()):
        for line in read_lines(path):
            for record in expand_views(parse_line(line, "auto", root=input_root(sample_input())), 0, 8):
                for sample in to_samples(record, tokenizer, settings, 8192, TokenSelection()):
                    sequences[sample.sample_id] = sample.token_ids
    return sequences


@pytest.mark.slow
def test_records_read_back_with_tensorflow_equal_a_direct_forward(default_run):
    import tensorflow as tf

    from beam_extract.format.schema import tf_feature_spec
    from beam_extract.model.loaded import load_model

    workdir, _, _ = default_run
    model = load_model("tiny-random-qwen2")
    spec = tf_feature_spec()
    sequences = full_sequences()
    specials = {151643, 151644, 151645}
    # One direct forward of every sequence, right-padded (causal: padding changes nothing before it),
    # so one shape compiles once.
    order = sorted(sequences)
    rows = np.zeros((len(order), max(len(s) for s in sequences.values())), np.int32)
    for row, sample_id in zip(rows, order):
        row[:len(sequences[sample_id])] = sequences[sample_id]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]
    forward = model.run_with_cache(rows, hooks)
    for layer in range(4):
        files = sorted((workdir / f"activations/resid_post/layer_{layer:02d}").glob("*.tfrecord"))
        records = [tf.io.parse_single_example(raw, spec) for raw in tf.data.TFRecordDataset([str(f) for f in files])]
        assert len(records) == 46
        assert len({r["sample_id"].numpy() for r in records}) == 46  # one record per (sample, hook)
        for record in records:
            hook = record["hook_name"].numpy().decode()
            assert hook == f"blocks.{layer}.hook_resid_post" and int(record["layer"]) == layer
            n, d = int(record["n_tokens"]), int(record["d_model"])
            token_ids = tf.sparse.to_dense(record["token_ids"]).numpy()
            positions = tf.sparse.to_dense(record["positions"]).numpy()
            full = sequences[record["sample_id"].numpy().decode()]
            # Special tokens are not stored by default; every other token is, at its position.
            assert list(positions) == [i for i, t in enumerate(full) if t not in specials]
            assert len(token_ids) == n and d == 64 and list(token_ids) == list(full[positions])
            # The record holds the model's whole input, special tokens included: a forward of it
            # gives the stored activations back.
            sequence = tf.sparse.to_dense(record["sequence_token_ids"]).numpy()
            assert list(sequence) == list(full)
            stored = tf.io.decode_raw(record["activations"], tf.float32).numpy().reshape(n, d)
            direct = forward[hook][order.index(record["sample_id"].numpy().decode())][positions]
            np.testing.assert_allclose(stored, direct, rtol=0, atol=1e-5 * max(1.0, np.abs(direct).max()))


@pytest.mark.slow
def test_normalisation_factors_equal_a_direct_computation(default_run):
    from beam_extract.readers.reader import read_activations

    workdir, _, _ = default_run
    manifest = json.loads((workdir / "activations/manifest.json").read_text())
    assert manifest["options"]["norm_exclude_first"] == 1
    for name, hook in manifest["hooks"].items():
        records = list(read_activations(str(workdir / "activations"), name))
        norms = np.concatenate([np.linalg.norm(r["activations"].astype(np.float64), axis=1) for r in records])
        first = np.concatenate([r["positions"] < 1 for r in records])
        # Text samples store their first token; ARC prompts start with <|im_start|>, not stored.
        assert first.sum() == sum(not r["task_id"] for r in records) == 6
        assert hook["tokens"] == len(norms) and hook["mean_l2_norm"] == pytest.approx(norms.mean(), rel=1e-6)
        assert hook["mean_squared_norm"] == pytest.approx(np.square(norms).mean(), rel=1e-6)
        kept = norms[~first]
        norm = hook["normalisation"]
        assert norm["excluded_first_positions"] == 1 and norm["tokens"] == len(kept)
        assert norm["mean_l2_norm"] == pytest.approx(kept.mean(), rel=1e-6)
        assert norm["saelens_scaling_factor"] == pytest.approx(np.sqrt(64) / kept.mean(), rel=1e-6)
        assert norm["unit_mean_squared_norm_factor"] == pytest.approx(1 / np.sqrt(np.square(kept).mean()), rel=1e-6)
        scaled = np.concatenate([r["activations"][r["positions"] >= 1] for r in records]) * norm["unit_mean_squared_norm_factor"]
        assert np.square(np.linalg.norm(scaled.astype(np.float64), axis=1)).mean() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.slow
def test_preview_predicts_the_bytes_written(default_run, capsys):
    from beam_extract import preview

    workdir, _, _ = default_run
    preview.main(["--stats", "--num", "0"])  # the default job's options
    written = sum(f.stat().st_size for f in (workdir / "activations").glob("resid_post/*/*.tfrecord"))
    assert f"in all ({written:,} bytes)" in capsys.readouterr().out


@pytest.mark.slow
def test_arc_records_carry_their_view(default_run):
    from beam_extract.readers.reader import read_records

    workdir, _, _ = default_run
    records = [r for r in read_records(str(workdir / "activations/resid_post/layer_00/*.tfrecord")) if r["task_id"]]
    expected = {f"{task}/v{view}/t{test}" for task, tests in
                [("sample-mirror", 1), ("sample-transpose", 1), ("sample-recolor", 1), ("sample-double", 2)]
                for view in range(8) for test in range(tests)}
    assert {r["sample_id"] for r in records} == expected
    for record in records:
        view = record["augmentation"]
        assert f"/v{view['view']}/t{view['test_index']}" in record["sample_id"]
        assert (view["hflip"], view["k"]) == (view["view"] >= 4, view["view"] % 4)
        assert sorted(view["color_map"]) == list(range(10)) and view["prompt_template"] == "output-from-examples-v1"


@pytest.mark.slow
def test_inspect_prints_a_table_and_writes_plots(default_run, capsys, tmp_path, monkeypatch):
    from beam_extract import inspect

    workdir, _, _ = default_run
    monkeypatch.chdir(tmp_path)  # where the plots go by default: the working directory, never the output
    before = sorted((workdir / "activations").rglob("*"))
    inspect.main([str(workdir / "activations")])
    out = capsys.readouterr().out
    assert "blocks.3.hook_resid_post" in out and "dead letters none" in out
    assert "the plots show the first 46 of 46 records per hook (4 hooks)" in out
    for name in ("inspect_norms.png", "inspect_tokens.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted((workdir / "activations").rglob("*")) == before


def sae_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_sae", TESTS.parent / "examples/train_sae.py")
    train_sae = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_sae)
    return train_sae


@pytest.mark.slow
def test_sae_example_trains_on_the_default_output(default_run):
    workdir, _, _ = default_run
    losses = sae_example().train(str(workdir / "activations"), "blocks.2.hook_resid_post", steps=300)
    assert len(losses) == 300 and np.mean(losses[-20:]) < 0.5 * losses[0]


@pytest.mark.slow
def test_transcoder_example_trains_on_the_default_job_of_mlp_sites(tmp_path):
    """The default job with --sites mlp_in,mlp_out: a transcoder from layer 2's normalised MLP input
    to its MLP output, read paired, learns (its loss falls below half the first step's)."""
    from beam_extract.pipeline import run

    run(["--runner=DirectRunner", "--sites=mlp_in,mlp_out", "--layers=2", f"--output={tmp_path / 'out'}"])
    losses = sae_example().train(str(tmp_path / "out"), "blocks.2.ln2.hook_normalized", steps=300,
                                 target="blocks.2.hook_mlp_out")
    print(f"transcoder mse: first {losses[0]:.3f}, last 20 {np.mean(losses[-20:]):.3f}")
    assert len(losses) == 300 and np.mean(losses[-20:]) < 0.5 * losses[0]
