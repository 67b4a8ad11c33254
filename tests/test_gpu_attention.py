"""The GPU attention kernel (run by Pallas' interpreter on CPU) against the portable attention."""

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from beam_extract.model.gpu_attention import flash_attention, padded_length
from beam_extract.model.mesh import parse_mesh
from beam_extract.model.decoder import attention


def test_flash_attention_matches_portable_attention_with_packing_and_padding():
    batch, seq, kv_heads, groups, dim = 2, 300, 2, 3, 16  # 300: not a multiple of the kernel's tiles
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, groups, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), jnp.float32) for _ in range(2))
    segments = np.zeros((batch, seq), np.int32)
    segments[0, :120], segments[0, 120:290] = 1, 2  # two packed documents, then padding
    segments[1, :seq] = 1  # one full-length document
    expected = np.asarray(attention(q, k, v, jnp.asarray(segments)))
    got = np.asarray(flash_attention(q, k, v, jnp.asarray(segments), mesh=parse_mesh("auto", jax.devices()[:1]),
                                     interpret=True))
    real = segments > 0
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[real], expected[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("seq", "padded"), [(1, 16), (16, 16), (50, 64), (96, 128), (128, 128), (129, 256),
                                             (300, 384), (512, 512)])
def test_sequences_pad_to_lengths_triton_tiles_divide(seq, padded):
    assert padded_length(seq) == padded
