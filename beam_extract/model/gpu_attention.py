"""Attention on NVIDIA GPUs: JAX's Pallas (Triton) flash-attention kernel with segment ids.

The portable tiled attention in decoder.py runs each tile behind a conditional; on a GPU that is many
small kernels with host round trips (an H100 ran the 0.5B forward at 0.14x of PyTorch's sdpa at
S=8192). The fused kernel keeps a query block's whole pass over the keys on chip. It wants one k/v
head per query head, so grouped k/v heads are repeated; under a mesh it runs per shard (rows on
"data", heads on "model").
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

with warnings.catch_warnings():  # deprecated for tokamax, which is not a JAX dependency
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

BLOCK = pallas_attention.BlockSizes.get_default().block_q


def padded_length(seq: int) -> int:
    """The kernel's tiles must divide the sequence, and Triton tiles are powers of two of at least 16:
    a short sequence pads to the next power of two, a longer one to a multiple of BLOCK."""
    if seq <= BLOCK:
        return max(16, 1 << (seq - 1).bit_length())
    return -(-seq // BLOCK) * BLOCK


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, mesh: Mesh,
                    scale: float | None = None, interpret: bool = False) -> jax.Array:
    """Same contract as decoder.attention: q [B, S, KV, G, D], k/v [B, S, KV, D] -> [B, S, KV, G, D].
    `interpret` runs the kernel in Pallas' interpreter (any platform; how tests check it on CPU)."""
    batch, seq, kv_heads, groups, dim = q.shape
    heads = kv_heads * groups
    pad = padded_length(seq) - seq  # appended positions are padding (segment 0): no real token sees them
    q = jnp.pad(q.reshape(batch, seq, heads, dim), ((0, 0), (0, pad), (0, 0), (0, 0)))
    k, v = (jnp.pad(jnp.repeat(x, groups, axis=2), ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    spec = PartitionSpec("data", None, "model" if heads % mesh.shape["model"] == 0 else None, None)
    kernel = functools.partial(pallas_attention.mha, sm_scale=dim**-0.5 if scale is None else scale, causal=True,
                               interpret=interpret)
    out = jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec("data", None)),
                        out_specs=spec, check_vma=False)(q, k, v, segment_ids)
    return out[:, :seq].reshape(batch, seq, kv_heads, groups, dim)
