"""Attention on TPUs: JAX's Pallas splash-attention kernel (Mosaic) with segment ids.

Same contract as decoder.attention. The kernel runs one row at a time (vmapped over the batch) on
[heads, S, D] with grouped-query attention native (q head h reads k/v head h // G, which is the
order of q's [KV, G] axes flattened). Its static mask is causal; the dynamic mask is segment
equality. Padding (segment 0) gets a distinct negative id per position, so a padding token sees
only itself, as in the portable attention: every row of the mask has its diagonal, so no row is
fully masked and nothing is NaN, and no real token (positive ids) ever sees padding.

Kernel requirements (splash_attention_kernel.py in the installed jax): the query and key tiles
must divide the sequence and the key tile must be a multiple of 128 (TPU lanes), so the sequence is
padded to a multiple of 128 and the tile is the largest of 512/256/128 that divides it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec

LANES = 128  # the kernel's key tiles (and so the padded sequence) are multiples of this
BLOCKS = (512, 256, 128)  # largest first: bigger tiles are faster on a TPU for long sequences


def padded_length(seq: int) -> int:
    """The sequence the kernel runs on: the next multiple of 128."""
    return -(-seq // LANES) * LANES


def block_size(padded: int) -> int:
    """The largest supported tile that divides a padded length (a multiple of 128)."""
    return next(block for block in BLOCKS if padded % block == 0)


def _kernel(seq: int, heads: int, interpret: bool | pltpu.InterpretParams):
    """A causal splash kernel for one row of `heads` query heads over `seq` (padded) positions.
    (Its block masks, numpy work proportional to (seq / block)^2, are cached by splash itself.)"""
    block = block_size(seq)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _heads_spec(kv_heads: int, heads: int, model: int) -> tuple[str | None, bool]:
    """How heads split on "model": on k/v heads (keeping GQA native) where they divide, else on
    query heads with k/v repeated per query head, else not at all. Returns (axis, repeat_kv)."""
    if kv_heads % model == 0:
        return "model", False
    if heads % model == 0:
        return "model", True
    return None, False


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, mesh: Mesh,
                     scale: float | None = None, interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Same contract as decoder.attention: q [B, S, KV, G, D], k/v [B, S, KV, D], segment_ids [B, S]
    (a token sees earlier tokens of its own segment; padding is segment 0 and sees only itself)
    -> [B, S, KV, G, D] in q's dtype; softmax statistics in float32. Rows are split on "data"
    (which must divide the batch, as for the other kernels) and heads on "model" where they
    divide. `interpret` runs the kernel in Pallas' interpreter on any platform (how tests check it on
    CPU): True for the generic one, pltpu.InterpretParams() for the one that simulates a TPU's
    memories (uninitialised buffers read as NaN, out-of-bounds reads raise)."""
    batch, seq, kv_heads, groups, dim = q.shape
    heads = kv_heads * groups
    padded = padded_length(seq)
    pad = padded - seq  # appended positions: padding that no real token sees (causal, and own ids)
    axis, repeat_kv = _heads_spec(kv_heads, heads, mesh.shape["model"])
    # Scaled as the portable attention scales: in q's dtype, before the scores. [B, H, S, D]
    q = (jnp.pad(q.reshape(batch, seq, heads, dim), ((0, 0), (0, pad), (0, 0), (0, 0)))
         * jnp.asarray(dim**-0.5 if scale is None else scale, q.dtype)).transpose(0, 2, 1, 3)
    if repeat_kv:
        k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k, v))  # [B, KV, S, D]
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    # Padding: -1 - position, distinct from every other id, so it matches only its own key.
    segment_ids = jnp.where(segment_ids > 0, segment_ids, -1 - jnp.arange(padded, dtype=jnp.int32))

    def per_shard(q, k, v, segment_ids):
        kernel = _kernel(padded, q.shape[1], interpret)
        row = lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(q=ids, kv=ids))
        if q.shape[0] == 1:  # one row per shard needs no batch grid axis (nor does the TPU interpreter,
            return row(q[0], k[0], v[0], segment_ids[0])[None]  # which cannot run a vmapped kernel)
        return jax.vmap(row)(q, k, v, segment_ids)  # on a TPU, Mosaic adds the batch as a grid axis

    spec = PartitionSpec("data", axis, None, None)
    out = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec("data", None)),
                        out_specs=spec, check_vma=False)(q, k, v, segment_ids)  # [B, H, S, D]
    return out[:, :, :seq].transpose(0, 2, 1, 3).reshape(batch, seq, kv_heads, groups, dim)


def supported(platform: str, dtype, head_dim: int) -> bool:
    """Whether the pipeline should run splash attention rather than the portable attention: 16-bit
    compute on a TPU (float32 keeps the portable attention, the parity reference), with a head
    dimension of whole 128-lane vregs or 64 (Qwen2-0.5B). This kernel version pads the lanes of
    smaller value heads itself; other sizes are not known to lower on a TPU, so they fall back."""
    return platform == "tpu" and np.dtype(dtype).itemsize == 2 and (head_dim % 128 == 0 or head_dim == 64)
