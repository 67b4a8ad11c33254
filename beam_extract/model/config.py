"""The architecture facts the forward needs, and the readers of transformers config fields that
the families share (RoPE, sliding windows).

Each family (families.py) turns its transformers config into one `ModelConfig` (hf_config.py reads
a checkpoint's config.json into one); the decoder reads only this object, so a family is data, not
code paths.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import transformers

# The dtypes a forward computes in (--dtype), by name.
COMPUTE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something this implementation does not compute."""

    def __init__(self, field: str, value: object, why: str):
        super().__init__(f"config field {field!r} = {value!r}: {why}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable, so it can be a static argument of `jax.jit`. The defaults are Qwen2's."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float  # 0.0: no RoPE (learned absolute positions)
    rms_norm_eps: float  # the epsilon of every norm, whatever its kind
    tie_word_embeddings: bool
    max_position_embeddings: int
    family: str = "qwen2"
    norm: str = "rms"  # rms: w * x/rms; rms_offset: x/rms * (1 + w) (Gemma); layer: LayerNorm with bias
    activation: str = "silu"  # the MLP's, as transformers names it
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores become cap * tanh(scores / cap)
    embed_scale: float | None = None  # embeddings times this, rounded to the compute dtype (Gemma)
    learned_positions: bool = False  # an embedding of positions is added to the tokens' (GPT-2)
    layer_windows: tuple[int, ...] = ()  # per layer, how many keys a query sees (itself included); 0: all
    rope_scaling: tuple[tuple[str, float | str], ...] = ()  # of the full-attention layers' RoPE
    rope_local_theta: float | None = None  # the sliding layers' RoPE base where it differs (Gemma 3)

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def sliding(self) -> bool:
        return any(self.layer_windows)

    def width(self, site: str) -> int:
        """The activation width of a site: the heads' outputs side by side for `z`, the MLP's
        hidden size for `mlp_post`, the residual's for the others."""
        return {"z": self.num_heads * self.head_dim, "mlp_post": self.intermediate_size}.get(site, self.hidden_size)

    def head_layout(self) -> dict:
        """How `z`'s columns hold the heads (TransformerLens's hook_z [n_heads, d_head], flattened)."""
        return {"n_heads": self.num_heads, "d_head": self.head_dim, "column": "head * d_head + i",
                "shape": [self.num_heads, self.head_dim]}


SCALED_ROPE = {"linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def read_rope(parameters: dict | None, fallback_theta: float | None = None) -> tuple[float, tuple]:
    """(theta, scaling) from one rope_parameters dict (transformers 5) or the older flat fields."""
    rope = dict(parameters or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" and rope_type not in SCALED_ROPE:
        why = ("depends on the longest sequence of each batch, so activations would depend on batching"
               if rope_type == "dynamic" else f"implemented RoPE types: default, {', '.join(SCALED_ROPE)}")
        raise UnsupportedConfigError("rope_scaling", rope, why)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError("partial_rotary_factor", rope["partial_rotary_factor"], "only full RoPE")
    theta = rope.get("rope_theta", fallback_theta)
    if theta is None:
        raise UnsupportedConfigError("rope_theta", None, "missing from config")
    if not isinstance(theta, (int, float)) or not 0 < theta < float("inf"):
        raise UnsupportedConfigError("rope_theta", theta, "must be a positive number")
    scaling: tuple = ()
    if rope_type != "default":
        missing = [key for key in SCALED_ROPE[rope_type] if not isinstance(rope.get(key), (int, float))]
        if missing:
            raise UnsupportedConfigError("rope_scaling", rope, f"{rope_type} RoPE needs a number for {missing[0]}")
        scaling = (("rope_type", rope_type), *((key, float(rope[key])) for key in SCALED_ROPE[rope_type]))
    return float(theta), scaling


def hf_rope(hf: transformers.PretrainedConfig) -> tuple[float, tuple]:
    """The RoPE of a config with one RoPE for all layers. transformers 5 moved rope_theta and
    rope_scaling into rope_parameters; older objects keep them flat."""
    parameters = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        parameters.update(scaling)
    return read_rope(parameters, getattr(hf, "rope_theta", None))


def layer_windows(hf: transformers.PretrainedConfig, every_layer: bool = False) -> tuple[int, ...]:
    """Per layer, the keys a query sees: `sliding_window` on the layers `layer_types` calls sliding
    (on every layer when `every_layer`, as Mistral's config says by `sliding_window` alone)."""
    window = getattr(hf, "sliding_window", None)
    kinds = list(getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers)
    if every_layer:
        kinds = ["sliding_attention" if window else "full_attention"] * hf.num_hidden_layers
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown or len(kinds) != hf.num_hidden_layers:
        raise UnsupportedConfigError("layer_types", kinds, "must name sliding_attention or full_attention per layer")
    if "sliding_attention" in kinds and (not isinstance(window, int) or window < 1):
        raise UnsupportedConfigError("sliding_window", window, "sliding layers need a positive window")
    windows = tuple(window if kind == "sliding_attention" else 0 for kind in kinds)
    return windows if any(windows) else ()


def check_context(config: ModelConfig, max_seq_len: int) -> None:
    """A sequence longer than the model's position range is an error: learned positions have no
    row for it, and RoPE models were not trained on it."""
    if max_seq_len > config.max_position_embeddings:
        raise ValueError(f"--max_seq_len {max_seq_len}: this {config.family} model has positions up to "
                         f"max_position_embeddings={config.max_position_embeddings}; use at most that")


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """[num_layers, head_dim // 2] float32 inverse frequencies of each layer's RoPE, computed in
    float32 as transformers computes them (so angles agree at long positions)."""
    dim = config.head_dim

    def inverse(theta: float, scaling: dict) -> np.ndarray:
        inv = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            return inv / np.float32(scaling["factor"])
        if kind == "llama3":  # transformers' _compute_llama3_parameters, step by step
            factor, low, high = (np.float32(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
            old = np.float32(scaling["original_max_position_embeddings"])
            wavelen = np.float32(2 * math.pi) / inv
            scaled = np.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old / high) & ~(wavelen > old / low)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    full = inverse(config.rope_theta, dict(config.rope_scaling))
    local = full if config.rope_local_theta is None else inverse(config.rope_local_theta, {})
    windows = config.layer_windows or (0,) * config.num_layers
    return np.stack([local if window else full for window in windows])
