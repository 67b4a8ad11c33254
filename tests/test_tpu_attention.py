"""The TPU splash-attention kernel (run by Pallas' TPU interpreter on CPU) against the portable attention."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from beam_extract.model.mesh import parse_mesh
from beam_extract.model.decoder import attention
from beam_extract.model.tpu_attention import block_size, padded_length, splash_attention, supported

# The interpreter that simulates a TPU's memories: buffers read before written are NaN and reads out
# of bounds raise, so a kernel tile that leaked into the result would show. It cannot run a vmapped
# kernel (jax 0.10.2: its grid gains the batch axis but not its dimension semantics), so it runs
# with one row per shard; batches of rows run in the generic interpreter (interpret=True).
TPU_INTERPRETER = pltpu.InterpretParams()
ROOT = Path(__file__).parent.parent


def inputs(seq, kv_heads, groups, dim, segments, dtype, seed=0):
    rng = np.random.default_rng(seed)
    batch = len(segments)
    q = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, groups, dim)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), dtype) for _ in range(2))
    return q, k, v, jnp.asarray(np.stack(segments), jnp.int32)


def packed_rows(seq):
    """A row of three packed documents then padding, a full-length document, a padding row, and a
    row that starts with padding (positions do not matter to attention, only segment ids)."""
    packed = np.zeros(seq, np.int32)
    packed[: seq // 3], packed[seq // 3: seq // 2], packed[seq // 2: seq - 7] = 1, 2, 3
    late = np.zeros(seq, np.int32)
    late[5:] = 1
    return [packed, np.ones(seq, np.int32), np.zeros(seq, np.int32), late]


def single_device():
    return parse_mesh("auto", jax.devices()[:1])


@pytest.mark.parametrize(("seq", "kv_heads", "groups"), [(50, 2, 3), (96, 1, 4), (300, 2, 2), (130, 3, 1)])
def test_float32_matches_portable_attention_at_every_position(seq, kv_heads, groups):
    q, k, v, segments = inputs(seq, kv_heads, groups, 16, packed_rows(seq), jnp.float32)
    expected = np.asarray(attention(q, k, v, segments))
    got = np.asarray(splash_attention(q, k, v, segments, mesh=single_device(), interpret=True))
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    # Padding too: each padding token sees only itself in both.
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "row"), [(jnp.float32, 0), (jnp.float32, 2), (jnp.bfloat16, 0), (jnp.bfloat16, 3)])
def test_tpu_interpreter_rows_match_portable_attention(dtype, row):
    seq = 300  # row 0: packed documents then padding; 2: all padding; 3: padding then a document
    for segments in packed_rows(seq)[row:row + 1]:
        q, k, v, ids = inputs(seq, 2, 3, 16, [segments], dtype, seed=row)
        expected = np.asarray(attention(q, k, v, ids), np.float32)
        got = np.asarray(splash_attention(q, k, v, ids, mesh=single_device(), interpret=TPU_INTERPRETER), np.float32)
        assert np.isfinite(got).all()
        tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
        np.testing.assert_allclose(got, expected, atol=tolerance, rtol=tolerance)


def test_padding_sees_only_itself_and_real_tokens_never_see_padding():
    seq = 40
    q, k, v, segments = inputs(seq, 1, 2, 8, packed_rows(seq), jnp.float32)
    got = np.asarray(splash_attention(q, k, v, segments, mesh=single_device(), interpret=True))
    padding = np.asarray(segments) == 0
    # Attending to itself alone, a padding token's output is its own value.
    np.testing.assert_allclose(got[padding], np.broadcast_to(np.asarray(v)[:, :, :, None], got.shape)[padding],
                               atol=1e-6)
    # Changing the keys and values of padding changes no real token.
    noise = jnp.asarray(padding[:, :, None, None] * 1e4, jnp.float32)
    again = np.asarray(splash_attention(q, k + noise, v - noise, segments, mesh=single_device(), interpret=True))
    np.testing.assert_array_equal(again[~padding], got[~padding])


def test_bfloat16_is_close_to_the_float32_portable_attention():
    seq = 300
    q, k, v, segments = inputs(seq, 2, 3, 32, packed_rows(seq), jnp.bfloat16, seed=1)
    got = splash_attention(q, k, v, segments, mesh=single_device(), interpret=True)
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    as32 = [x.astype(jnp.float32) for x in (q, k, v)]
    reference = np.asarray(attention(*as32, segments))
    portable16 = np.asarray(attention(q, k, v, segments), np.float32)
    np.testing.assert_allclose(got, reference, atol=3e-2, rtol=3e-2)
    # No further from float32 than the portable attention in bfloat16 is (a little slack for rounding).
    assert np.abs(got - reference).max() <= 1.5 * np.abs(portable16 - reference).max()
    real = np.asarray(segments) > 0
    cosine = (got * reference).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(reference, axis=-1))
    assert cosine[real].min() >= 0.999


def test_cached_kernels_are_reused_across_jit_traces():
    jitted = jax.jit(functools.partial(splash_attention, mesh=single_device(), interpret=True))
    for batch in (1, 2):  # a second trace would meet a tracer leaked by a first one's kernel
        q, k, v, segments = inputs(20, 1, 2, 8, packed_rows(20)[:batch], jnp.float32)
        np.testing.assert_allclose(np.asarray(jitted(q, k, v, segments)), np.asarray(attention(q, k, v, segments)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("seq", "padded", "block"), [(1, 128, 128), (50, 128, 128), (128, 128, 128),
                                                      (129, 256, 256), (300, 384, 128), (513, 640, 128),
                                                      (1000, 1024, 512), (8192, 8192, 512)])
def test_sequences_pad_to_whole_lanes_and_tiles_divide_them(seq, padded, block):
    assert padded_length(seq) == padded and block_size(padded) == block


def test_splash_runs_for_16_bit_compute_on_a_tpu_with_laid_out_head_dims():
    assert supported("tpu", jnp.bfloat16, 64) and supported("tpu", jnp.float16, 128) and supported("tpu", "bfloat16", 256)
    assert not supported("tpu", jnp.float32, 128)
    assert not supported("gpu", jnp.bfloat16, 128) and not supported("cpu", jnp.bfloat16, 128)
    assert not supported("tpu", jnp.bfloat16, 80)


MESH_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas import tpu as pltpu
sys.path.insert(0, sys.argv[1])
from test_tpu_attention import inputs, packed_rows
from beam_extract.model.mesh import parse_mesh
from beam_extract.model.decoder import attention
from beam_extract.model.tpu_attention import splash_attention

assert len(jax.devices()) == 8
seq = 70
q, k, v, segments = inputs(seq, 2, 2, 8, packed_rows(seq), jnp.float32)  # 4 rows, 2 k/v heads, 4 query heads
expected = np.asarray(attention(q, k, v, segments))
report = {}
# data:2,model:2 splits k/v heads; model:4 splits query heads (k/v repeated); model:8 splits none.
# data:4 has one row per shard, which the TPU interpreter can run.
for spec in ("data:4", "data:2,model:2", "model:4", "model:8"):
    mesh = parse_mesh(spec, jax.devices()[:int(np.prod([int(p.split(":")[1]) for p in spec.split(",")]))])
    interpret = pltpu.InterpretParams() if spec == "data:4" else True
    got = np.asarray(splash_attention(q, k, v, segments, mesh=mesh, interpret=interpret))
    report[spec] = float(np.abs(got - expected).max()) if np.isfinite(got).all() else "not finite"
# Qwen2-0.5B's heads (2 k/v heads, 14 query heads, 64 dims) on a data:4,model:2 TPU mesh, cross-lowered.
attend = jax.jit(lambda *args: splash_attention(*args, mesh=parse_mesh("data:4,model:2", jax.devices())))
shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16)
exported = jax.export.export(attend, platforms=["tpu"])(shape(8, 300, 2, 7, 64), shape(8, 300, 2, 64),
                                                        shape(8, 300, 2, 64), jax.ShapeDtypeStruct((8, 300), jnp.int32))
report["lowered"] = [exported.nr_devices, "tpu_custom_call" in exported.mlir_module()]
print(json.dumps(report))
"""


def test_sharded_meshes_match_portable_attention():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(Path(__file__).parent)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("lowered") == [8, True]
    assert set(report) == {"data:4", "data:2,model:2", "model:4", "model:8"}
    for spec, error in report.items():
        assert error != "not finite" and error <= 1e-5, (spec, error)


@pytest.mark.parametrize(("batch", "seq", "kv_heads", "groups", "dim"), [(2, 300, 2, 7, 64), (3, 1000, 4, 7, 128)])
def test_lowers_for_a_tpu(batch, seq, kv_heads, groups, dim):
    """Cross-lowering (no TPU needed) runs Pallas' Mosaic lowering of the kernel as built here: the
    vmapped batch grid axis, the tiles, segment ids, Qwen2's head sizes. Mosaic's own compile is
    libtpu's, on a TPU, and is not checked here."""
    attend = jax.jit(functools.partial(splash_attention, mesh=single_device()))
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16)
    exported = jax.export.export(attend, platforms=["tpu"])(
        shape(batch, seq, kv_heads, groups, dim), shape(batch, seq, kv_heads, dim), shape(batch, seq, kv_heads, dim),
        jax.ShapeDtypeStruct((batch, seq), jnp.int32))
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == (batch, seq, kv_heads, groups, dim)
    assert exported.out_avals[0].dtype == jnp.bfloat16
