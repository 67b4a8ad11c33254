"""Sharded forwards on an 8-device host mesh (XLA's CPU device count flag) equal one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beam_extract.model.mesh import parse_mesh

TESTS = Path(__file__).parent
SCRIPT = """
import json, sys
import jax, numpy as np
from pathlib import Path
from beam_extract.model.loaded import load_model
from beam_extract.model.mesh import parse_mesh
from hf_reference import random_hf_checkpoint

assert len(jax.devices()) == 8
directory = Path(sys.argv[1])
random_hf_checkpoint(directory, seed=4, intermediate_size=164, tie_word_embeddings=False)
from beam_extract.hooks import hook_name
# The inner sites too: z (heads split over "model") and mlp_post (164 wide: its columns do not divide 8).
hooks = [hook_name(l, s) for l in range(3) for s in ("resid_pre", "attn_out", "mlp_out", "resid_post", "mlp_in", "z",
                                                     "mlp_post")]
ids = np.random.default_rng(0).integers(0, 512, size=(8, 37))
lengths = np.array([37, 20, 5, 37, 1, 30, 36, 2])
single = load_model(str(directory), mesh=parse_mesh("data:1", jax.devices()[:1])).run_with_cache(ids, hooks, lengths)
report = {}
for spec in ("data:8", "data:4,model:2", "data:2,model:4", "model:8"):
    model = load_model(str(directory), mesh=spec)
    sharded = model.run_with_cache(ids, hooks, lengths)
    report[spec] = max(float(np.abs(sharded[h][r, :n] - single[h][r, :n]).max() / max(1.0, np.abs(single[h]).max()))
                       for h in hooks for r, n in enumerate(lengths))
    report[spec + " q_w"] = str(model.params["layers"]["q_w"].sharding.spec)
    report[spec + " gate_w"] = str(model.params["layers"]["gate_w"].sharding.spec)
print(json.dumps(report))
"""


def eight_device_env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def test_sharded_meshes_equal_single_device(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=eight_device_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for spec in ("data:8", "data:4,model:2", "data:2,model:4", "model:8"):
        assert report[spec] <= 1e-5, (spec, report[spec])
    # Megatron layout: q/k/v/gate/up split on output columns; a size that does not divide stays whole.
    assert report["model:8 q_w"] == "P(None, None, 'model')"
    assert report["data:2,model:4 gate_w"] == "P(None, None, 'model')"
    assert report["model:8 gate_w"] == "P(None, None, None)"  # 164 columns over 8 devices


def test_mesh_specs():
    import jax

    device = jax.devices()[:1]
    assert dict(parse_mesh("auto", device).shape) == {"data": 1, "model": 1}
    for bad in ("data:2", "data:x", "pipe:1", "data:0"):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad, device)


@pytest.mark.slow
def test_pipeline_on_an_eight_device_mesh(tmp_path):
    from beam_extract.model.loaded import load_model
    from beam_extract.readers.reader import read_records
    from test_pipeline_default_run import run_guarded

    log = tmp_path / "connections.log"
    result = run_guarded(["--mesh=data:4,model:2", "--output=out", "--sites=resid_mid", "--layers=0,3",
                          "--exclude_special_tokens=false",
                          "--views_per_task=2"], tmp_path, log,
                         XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert result.returncode == 0, result.stderr[-5000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["counts"]["samples"] == 16 and manifest["options"]["mesh"] == "data:4,model:2"
    model = load_model("tiny-random-qwen2")
    for layer in (0, 3):
        records = list(read_records(str(tmp_path / f"out/resid_mid/layer_{layer:02d}/*.tfrecord")))
        assert len(records) == 16
        for record in records:
            hook = record["hook_name"]
            direct = model.run_with_cache(record["token_ids"][None], [hook])[hook][0]
            np.testing.assert_allclose(record["activations"], direct, rtol=0, atol=1e-5 * max(1, np.abs(direct).max()))


def test_compiles_at_most_once_per_row_length(tmp_path):
    """Many input lengths, one process: the compile metric never exceeds the row lengths used."""
    from apache_beam.metrics.metric import MetricsFilter

    from beam_extract.pipeline import run

    words = "lorem ipsum dolor sit amet consectetur adipiscing elit".split()
    rng = np.random.default_rng(0)
    with open(tmp_path / "docs.jsonl", "w") as handle:
        for i in range(120):
            n = int(rng.integers(1, 700))
            handle.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words, n))}) + "\n")
    result, job = run([f"--input={tmp_path / 'docs.jsonl'}", f"--output={tmp_path / 'out'}", "--packing=off",
                       "--max_seq_len=512", "--buckets=multiples:64", "--layers=0", "--batch_size=4"])
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    compiles = result.metrics().query(MetricsFilter().with_name("compilations"))["counters"]
    assert sum(c.committed for c in compiles) == manifest["batching"]["compilations"]
    assert 4 <= manifest["batching"]["compilations"] <= len(manifest["batching"]["batch_shapes"])
    assert manifest["counts"]["samples"] >= 120


FAMILIES_SCRIPT = """
import json, sys
import jax, numpy as np
from pathlib import Path
from beam_extract.model.loaded import load_model
from beam_extract.model.mesh import parse_mesh
from hf_reference import random_hf_checkpoint

report = {}
ids = np.random.default_rng(0).integers(0, 512, size=(4, 21))
lengths = np.array([21, 9, 1, 16])
# Heads that split over "model" (8 of Gemma's, GPT-2's fused q/k/v columns) and ones that do not.
for family, overrides in [("gemma2", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                          hidden_size=64, layer_types=None)),
                          ("gpt2", dict(n_embd=64, n_head=4)), ("mistral", {})]:
    directory = Path(sys.argv[1]) / family
    random_hf_checkpoint(directory, seed=3, family=family, **overrides)
    hooks = [f"blocks.{l}.hook_{s}" for l in range(3) for s in ("attn_out", "resid_post")]
    one_device = parse_mesh("data:1", jax.devices()[:1])
    single = load_model(str(directory), mesh=one_device).run_with_cache(ids, hooks, lengths)
    model = load_model(str(directory), mesh="data:2,model:4")
    sharded = model.run_with_cache(ids, hooks, lengths)
    report[family] = max(float(np.abs(sharded[h][r, :n] - single[h][r, :n]).max() / max(1.0, np.abs(single[h]).max()))
                         for h in hooks for r, n in enumerate(lengths))
    report[family + " q_w"] = str(model.params["layers"]["q_w"].sharding.spec)
print(json.dumps(report))
"""


def test_families_on_a_model_parallel_mesh_equal_single_device(tmp_path):
    """Gemma's sliding windows and soft-capping (the window goes into each shard's attention),
    GPT-2's q/k/v split from its fused tensor at load, Mistral's windows on every layer."""
    result = subprocess.run([sys.executable, "-c", FAMILIES_SCRIPT, str(tmp_path)], env=eight_device_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for family in ("gemma2", "gpt2", "mistral"):
        assert report[family] <= 1e-5, (family, report[family])
    assert report["gemma2 q_w"] == report["gpt2 q_w"] == "P(None, None, 'model')"


def test_devices_are_listed_in_this_process_only_where_the_workers_are_its_threads():
    """A child process lists them (the driver must not hold an accelerator that worker processes
    need) unless the workers are threads of the driver's process; both see the same devices."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_extract.runners import workers_in_this_process
    from beam_extract.model import devices

    here = {"--runner=FnApiRunner": True, "--runner=DirectRunner": True,
            "--runner=FnApiRunner --direct_running_mode=multi_threading": True,
            "--runner=FnApiRunner --direct_running_mode=multi_processing": False,
            "--runner=PrismRunner": False, "--runner=PrismRunner --environment_type=LOOPBACK": True,
            "--runner=DataflowRunner": False}
    assert {args: workers_in_this_process(PipelineOptions(args.split())) for args in here} == here
    assert devices._list_here() == devices._list()
