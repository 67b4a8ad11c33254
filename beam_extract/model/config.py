"""The Qwen2 architecture facts the forward needs, read through transformers' own config classes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import transformers


class UnsupportedConfigError(ValueError):
    """The checkpoint's config asks for something this implementation does not compute."""

    def __init__(self, field: str, value: object, why: str):
        super().__init__(f"config field {field!r} = {value!r}: {why}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable, so it can be a static argument of `jax.jit`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def _rope_theta(hf: transformers.PretrainedConfig) -> float:
    # transformers 5 moved rope_theta (and rope_scaling) into rope_parameters; older objects keep it flat.
    rope = getattr(hf, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedConfigError("rope_scaling", rope, "only the default RoPE is implemented")
    scaling = getattr(hf, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise UnsupportedConfigError("rope_scaling", scaling, "only the default RoPE is implemented")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise UnsupportedConfigError("rope_theta", None, "missing from config")
    return float(theta)


def config_from_hf(hf: transformers.PretrainedConfig) -> ModelConfig:
    """Validates a transformers config and keeps what the forward uses."""
    if hf.model_type != "qwen2":
        raise UnsupportedConfigError("model_type", hf.model_type, "only Qwen2 checkpoints are supported")
    if hf.hidden_act != "silu":
        raise UnsupportedConfigError("hidden_act", hf.hidden_act, "only SiLU (SwiGLU) MLPs are implemented")
    if getattr(hf, "use_sliding_window", False):
        raise UnsupportedConfigError("use_sliding_window", True, "sliding-window attention is not implemented")
    layer_types = getattr(hf, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedConfigError("layer_types", layer_types, "only full attention is implemented")
    kv_heads = hf.num_key_value_heads or hf.num_attention_heads
    if hf.num_attention_heads % kv_heads:
        raise UnsupportedConfigError(
            "num_key_value_heads", kv_heads, f"must divide num_attention_heads={hf.num_attention_heads}"
        )
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        max_position_embeddings=hf.max_position_embeddings,
    )


def load_hf_config(model_dir: str | Path) -> transformers.PretrainedConfig:
    """config.json through AutoConfig: no remote code, so only transformers' own classes load."""
    return transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
