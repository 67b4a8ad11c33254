"""The decoder of every family (families.py) as pure JAX functions over a parameter pytree.

Layers are stacked on a leading axis and run with `lax.scan`, so compile time does not grow with
depth. Only layers up to the deepest requested hook run; no final norm, no logits. What differs
between families is data: the ModelConfig's kinds and options, and which parameters a layer has
(biases, q/k norms, Gemma's norms after each sublayer). Numerics follow transformers: norms and
softmax in float32, RoPE with rotate_half.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from beam_extract.hooks import Hook
from beam_extract.model.config import ACTIVATIONS as ACTIVATION_NAMES, ModelConfig, rope_frequencies

# Attention runs over [BLOCK x BLOCK] tiles of (queries, keys) with an online softmax, so no
# score tensor is larger than one tile, and tiles no query may see (above the causal diagonal, or
# between different packed documents) are skipped. Tiles are loops, not unrolled code, so compile
# time does not grow with the sequence. 128 keeps a tile's scores in cache on CPUs: at S=1024 it
# ran the 0.5B forward 1.18x faster than 512 tiles (2-core EPYC).
BLOCK = 128
# A finite floor instead of -inf keeps fully masked tiles finite; they are corrected away as soon
# as a visible key arrives (every query sees at least itself).
MASKED = -1e30
# The window of a layer that attends to every earlier key: farther than any sequence.
FULL_WINDOW = 1 << 30

# The contract of `attention`: (q, k, v, segment_ids, *, scale, [window], [softcap]) -> out.
Attention = Callable[..., jax.Array]

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_new": jax.nn.gelu, "gelu_pytorch_tanh": jax.nn.gelu}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES  # the names config.py checks, without JAX there


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def norm(x: jax.Array, layer: dict, name: str, config: ModelConfig) -> jax.Array:
    """The family's norm with the layer's parameters `name` (and `name_b`), each rounded to x's dtype
    where transformers rounds it."""
    if config.norm == "rms":
        return rms_norm(x, layer[name], config.rms_norm_eps)
    x32 = x.astype(jnp.float32)
    if config.norm == "rms_offset":  # Gemma: scaled by 1 + w in float32, then rounded
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.rms_norm_eps)
        return (normed * (1.0 + layer[name].astype(jnp.float32))).astype(x.dtype)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)  # LayerNorm
    normed = centred * lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + config.rms_norm_eps)
    return (normed * layer[name].astype(jnp.float32) + layer[f"{name}_b"].astype(jnp.float32)).astype(x.dtype)


def linear(x: jax.Array, layer: dict, name: str) -> jax.Array:
    """x @ `name`_w, plus `name`_b where the layer has that bias."""
    y = dense(x, layer[f"{name}_w"])
    return y + layer[f"{name}_b"] if f"{name}_b" in layer else y


def mlp(x: jax.Array, layer: dict, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(hidden, out): gated act(gate) * up where the layer has a gate, else act(up); then down."""
    act = ACTIVATIONS[config.activation]
    up = linear(x, layer, "up")
    hidden = act(linear(x, layer, "gate")) * up if "gate_w" in layer else act(up)
    return hidden, linear(hidden, layer, "down")


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in x's dtype. On CPUs a bf16 dot with a float32 result is the native AVX512-BF16 GEMM
    (~2x the float32 rate on this project's EPYC), while a bf16-result dot ran slower than float32.
    GPUs and TPUs accumulate bf16 dots in float32 anyway, and there the float32 result cost ~10%
    (H100)."""
    if jax.default_backend() == "cpu":
        return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return x @ w


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, S, heads, head_dim]; positions: [B, S]; inv_freq: [head_dim // 2] float32 (the layer's
    row of config.rope_frequencies). Half-split rotation (rotate_half)."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, scale: float | None = None,
              window: jax.Array | int | None = None, softcap: float | None = None) -> jax.Array:
    """Causal grouped-query attention within segments.

    q: [B, S, KV, G, D]; k, v: [B, S, KV, D]; segment_ids: [B, S] (a token sees earlier tokens of
    its own segment, a contiguous run of tokens; padding is segment 0 and sees only itself). Returns
    [B, S, KV, G, D]. Softmax statistics are float32. Scores are q.k * `scale` (default D ** -0.5),
    soft-capped to softcap * tanh(score / softcap) when `softcap` is given; with a `window` a query
    sees only the last `window` keys of its segment, itself included.
    """
    batch, seq, kv_heads, groups, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    block = min(BLOCK, seq)
    pad = -seq % block  # appended positions are padding (segment 0): no real token sees them
    # Heads-major layouts, transposed once: every tile is then a plain batched matmul over (B, KV).
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).transpose(0, 2, 3, 1, 4) * jnp.asarray(
        scale, q.dtype)  # [B, KV, G, S, D]
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for x in (k, v))  # [B, KV, S, D]
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    # Where each token's segment begins: no query sees a key before it, so a query block's loop over
    # key blocks starts at its first query's segment (on packed rows of short documents, a few
    # blocks instead of every block up to the diagonal).
    index = jnp.arange(seq + pad)
    begins = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    segment_start = lax.cummax(jnp.where(begins, index, 0), axis=1)

    def query_block(start):
        q_blk = lax.dynamic_slice_in_dim(q, start, block, axis=3)
        q_seg = lax.dynamic_slice_in_dim(segment_ids, start, block, axis=1)
        q_index = start + jnp.arange(block)[:, None]

        def key_block(j, state):
            k_start = j * block
            k_index = k_start + jnp.arange(block)[None, :]
            k_seg = lax.dynamic_slice_in_dim(segment_ids, k_start, block, axis=1)[:, None, :]
            # Padding (segment 0) sees only itself, so tiles of pure padding are skipped too.
            causal = q_index >= k_index if window is None else (q_index >= k_index) & (q_index - k_index < window)
            visible = causal[None] & (q_seg[:, :, None] == k_seg) & ((k_seg > 0) | (q_index == k_index))
            tile = (lax.dynamic_slice_in_dim(k, k_start, block, axis=2),
                    lax.dynamic_slice_in_dim(v, k_start, block, axis=2), visible)
            return lax.cond(jnp.any(visible), functools.partial(_attend_tile, softcap=softcap),
                            lambda state, *_: state, state, q_blk, *tile)

        stats = (batch, kv_heads, groups, block)
        state = (jnp.full(stats, MASKED, jnp.float32),  # running max
                 jnp.zeros(stats, jnp.float32),  # running sum of exp
                 jnp.zeros((*stats, dim), jnp.float32))  # running weighted values
        # Causal: key blocks past this query block's last position are never visited; nor, with a
        # window, those wholly before the first query's window.
        first_key = segment_start[:, start] if window is None else jnp.maximum(segment_start[:, start],
                                                                               start - window + 1)
        first = jnp.min(first_key) // block
        _, total, weighted = lax.fori_loop(first, start // block + 1, key_block, state)
        return (weighted / total[..., None]).astype(v.dtype)

    blocks = lax.map(query_block, jnp.arange(0, seq + pad, block))  # [n_blocks, B, KV, G, block, D]
    out = blocks.transpose(1, 0, 4, 2, 3, 5).reshape(batch, seq + pad, kv_heads, groups, dim)
    return out[:, :seq]


def _attend_tile(state, q_blk, k_blk, v_blk, visible, softcap=None):
    """Folds one tile of keys into the online-softmax state of a query block."""
    running_max, total, weighted = state
    scores = jnp.einsum("bkgtd,bksd->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(visible[:, None, None], scores, MASKED)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    probs = jnp.exp(scores - new_max[..., None])
    rescale = jnp.exp(running_max - new_max)
    total = total * rescale + probs.sum(axis=-1)
    update = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
    return new_max, total, weighted * rescale[..., None] + update


def decoder_block(
    x: jax.Array, layer: dict, positions: jax.Array, segment_ids: jax.Array, config: ModelConfig,
    attend: Attention = attention, inv_freq: jax.Array | None = None, window: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """One pre-norm decoder layer; returns every site's activation ([B, S, config.width(site)] each;
    unused ones cost nothing under jit). `inv_freq` is the
    layer's RoPE (None: positions are learned, added to the embeddings); `window` its sliding window
    (None: the model has none)."""
    batch, seq, _ = x.shape
    kv, groups, dim = config.num_kv_heads, config.kv_groups, config.head_dim
    h = norm(x, layer, "attn_norm", config)
    q = linear(h, layer, "q").reshape(batch, seq, kv * groups, dim)
    k = linear(h, layer, "k").reshape(batch, seq, kv, dim)
    v = linear(h, layer, "v").reshape(batch, seq, kv, dim)
    if "q_norm" in layer:  # per head, before RoPE (Qwen3, Gemma 3)
        q, k = norm(q, layer, "q_norm", config), norm(k, layer, "k_norm", config)
    if inv_freq is not None:
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    # Only what the model uses is passed: a kernel without windows or soft-capping then cannot be
    # handed a model that needs them (loaded.Model picks the portable attention for those).
    options = {"window": window} if window is not None else {}
    if config.attn_softcap is not None:
        options["softcap"] = config.attn_softcap
    z = attend(q.reshape(batch, seq, kv, groups, dim), k, v, segment_ids, scale=config.attention_scale,
               **options).reshape(batch, seq, kv * groups * dim)  # head h = kv * groups + g: transformers' order
    attn_out = linear(z, layer, "o")
    if "attn_post_norm" in layer:  # Gemma normalises what each sublayer adds to the residual
        attn_out = norm(attn_out, layer, "attn_post_norm", config)
    resid_mid = x + attn_out
    mlp_in = norm(resid_mid, layer, "mlp_norm", config)
    mlp_post, mlp_out = mlp(mlp_in, layer, config)
    if "mlp_post_norm" in layer:
        mlp_out = norm(mlp_out, layer, "mlp_post_norm", config)
    return {
        "resid_pre": x,
        "attn_out": attn_out,
        "resid_mid": resid_mid,
        "mlp_out": mlp_out,
        "resid_post": resid_mid + mlp_out,
        "mlp_in": mlp_in,
        "z": z,
        "mlp_post": mlp_post,
    }


def embed(params: dict, tokens: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """The first block's input: token embeddings (scaled in their dtype where the family scales
    them), plus learned position embeddings where the family has them."""
    x = params["embed"][tokens]
    if config.embed_scale is not None:
        x = x * jnp.asarray(config.embed_scale, x.dtype)
    if config.learned_positions:
        x = x + params["pos_embed"][positions]
    return x


def forward(
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    *,
    config: ModelConfig,
    hooks: tuple[Hook, ...],
    attend: Attention = attention,
) -> dict[Hook, jax.Array]:
    """Activations at `hooks` for tokens [B, S]; each value is [B, S, config.width(site)] in the
    compute dtype.
    `attend` may replace the portable attention with a kernel for the platform.

    The layer scan carries one buffer per requested site with a slot per requested layer and one
    scratch slot: each step writes its activation into its layer's slot, or into the scratch slot
    when that layer was not asked for. Device memory thus grows with the hooks, not with the depth
    of the deepest one, and there is still one scan, so compile time does not grow with depth.
    """
    depth = max(layer for layer, _ in hooks) + 1
    requested = {site: sorted({layer for layer, s in hooks if s == site}) for _, site in hooks}
    # site -> the slot each layer writes to; the last slot is scratch, overwritten by every layer not asked for.
    slot_of = {site: jnp.asarray([kept.index(layer) if layer in kept else len(kept) for layer in range(depth)],
                                 jnp.int32) for site, kept in requested.items()}
    x = embed(params, tokens, positions, config)
    buffers = {site: jnp.zeros((len(kept) + 1, *x.shape[:2], config.width(site)), x.dtype)
               for site, kept in requested.items()}

    # Per-layer options ride along the scan: each layer's RoPE frequencies and sliding window.
    per_layer = {}
    if not config.learned_positions:
        per_layer["inv_freq"] = jnp.asarray(rope_frequencies(config)[:depth])
    if config.sliding:
        per_layer["window"] = jnp.asarray([w or FULL_WINDOW for w in config.layer_windows[:depth]], jnp.int32)

    def step(carry, scanned):
        x, buffers = carry
        index, slots, options = scanned
        # One layer's weights per step, read in place (a slice [:depth] of the stack would copy the weights).
        layer = jax.tree.map(lambda stacked: lax.dynamic_index_in_dim(stacked, index, keepdims=False), params["layers"])
        acts = decoder_block(x, layer, positions, segment_ids, config, attend, **options)
        buffers = {site: lax.dynamic_update_index_in_dim(buffer, acts[site], slots[site], axis=0)
                   for site, buffer in buffers.items()}
        return (acts["resid_post"], buffers), None

    (_, buffers), _ = lax.scan(step, (x, buffers), (jnp.arange(depth), slot_of, per_layer))
    return {(layer, site): buffers[site][requested[site].index(layer)] for layer, site in hooks}
