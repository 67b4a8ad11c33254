"""Qwen2 decoder forward as pure JAX functions over a parameter pytree.

Layers are stacked on a leading axis and run with `lax.scan`, so compile time does not grow with
depth. Only layers up to the deepest requested hook run; no final norm, no logits.
Numerics follow transformers' Qwen2: RMSNorm and softmax in float32, RoPE with rotate_half.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from beam_extract.model.config import ModelConfig

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")

# Queries are processed in blocks of this many rows so that no [S, S] score tensor exists for
# long prompts; each block sees [block, S] scores.
QUERY_BLOCK = 512

Hook = tuple[int, str]  # (layer, site)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """x: [B, S, heads, head_dim]; positions: [B, S]. Half-split rotation (rotate_half)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Causal grouped-query attention within segments.

    q: [B, S, KV, G, D]; k, v: [B, S, KV, D]; segment_ids: [B, S] (a token attends to earlier
    tokens of its own segment; padding is its own segment). Returns [B, S, KV, G, D].

    Query block i only scores keys [0, end of block i): the causal upper triangle beyond the block
    is never computed, and no score tensor is larger than [block, S].
    """
    seq, dim = q.shape[1], q.shape[-1]
    outputs = []
    for start in range(0, seq, QUERY_BLOCK):
        stop = min(seq, start + QUERY_BLOCK)
        scores = jnp.einsum("btkgd,bskd->bkgts", q[:, start:stop], k[:, :stop],
                            preferred_element_type=jnp.float32) * dim**-0.5
        causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
        same_segment = segment_ids[:, start:stop, None] == segment_ids[:, None, :stop]
        scores = jnp.where((causal & same_segment)[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # every row sees at least itself
        outputs.append(jnp.einsum("bkgts,bskd->btkgd", probs, v[:, :stop]))
    return jnp.concatenate(outputs, axis=1)


def decoder_block(
    x: jax.Array, layer: dict, positions: jax.Array, segment_ids: jax.Array, config: ModelConfig
) -> dict[str, jax.Array]:
    """One pre-norm decoder layer; returns every site's activation ([B, S, d] each)."""
    batch, seq, _ = x.shape
    kv, groups, dim = config.num_kv_heads, config.kv_groups, config.head_dim
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    q = (h @ layer["q_w"] + layer["q_b"]).reshape(batch, seq, kv * groups, dim)
    k = (h @ layer["k_w"] + layer["k_b"]).reshape(batch, seq, kv, dim)
    v = (h @ layer["v_w"] + layer["v_b"]).reshape(batch, seq, kv, dim)
    q = apply_rope(q, positions, config.rope_theta).reshape(batch, seq, kv, groups, dim)
    k = apply_rope(k, positions, config.rope_theta)
    attn = attention(q, k, v, segment_ids).reshape(batch, seq, kv * groups * dim)
    attn_out = attn @ layer["o_w"]
    resid_mid = x + attn_out
    h = rms_norm(resid_mid, layer["mlp_norm"], config.rms_norm_eps)
    mlp_out = (jax.nn.silu(h @ layer["gate_w"]) * (h @ layer["up_w"])) @ layer["down_w"]
    return {
        "resid_pre": x,
        "attn_out": attn_out,
        "resid_mid": resid_mid,
        "mlp_out": mlp_out,
        "resid_post": resid_mid + mlp_out,
    }


def forward(
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    *,
    config: ModelConfig,
    hooks: tuple[Hook, ...],
) -> dict[Hook, jax.Array]:
    """Activations at `hooks` for tokens [B, S]; each value is [B, S, d] in the compute dtype."""
    depth = max(layer for layer, _ in hooks) + 1
    sites = sorted({site for _, site in hooks})
    layers = jax.tree.map(lambda stacked: stacked[:depth], params["layers"])

    def step(x, layer):
        acts = decoder_block(x, layer, positions, segment_ids, config)
        return acts["resid_post"], {site: acts[site] for site in sites}

    _, per_layer = lax.scan(step, params["embed"][tokens], layers)
    return {(layer, site): per_layer[site][layer] for layer, site in hooks}
