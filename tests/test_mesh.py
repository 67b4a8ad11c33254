"""Sharded forwards on an 8-device host mesh (XLA's CPU device count flag) equal one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beam_extract.model.mesh import parse_mesh

TESTS = Path(__file__).parent
SCRIPT = """
import json, sys
import jax, numpy as np
from pathlib import Path
from beam_extract.model import load_model
from beam_extract.model.mesh import parse_mesh
from hf_reference import random_hf_checkpoint

assert len(jax.devices()) == 8
directory = Path(sys.argv[1])
random_hf_checkpoint(directory, seed=4, intermediate_size=164, tie_word_embeddings=False)
hooks = [f"blocks.{l}.hook_{s}" for l in range(3) for s in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
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
