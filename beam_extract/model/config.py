"""The Qwen2 architecture facts the forward needs, read through transformers' own config classes."""

from __future__ import annotations

import dataclasses
import json
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
    if not isinstance(theta, (int, float)) or not 0 < theta < float("inf"):
        raise UnsupportedConfigError("rope_theta", theta, "must be a positive number")
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


# Sizes config.json may give, checked before any transformers constructor sees them (a constructor
# builds per-layer lists, so `num_hidden_layers: 1e9` would hang it). Far above any model we load.
CONFIG_BOUNDS = {
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24,
}
MAX_CONFIG_BYTES = 1 << 20


def check_config_json(path: Path) -> dict:
    """config.json's sizes within CONFIG_BOUNDS, as whole numbers; anything else is an error naming the
    field."""
    if not path.is_file():
        raise UnsupportedConfigError("config.json", str(path), "is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UnsupportedConfigError("config.json", f"{path.stat().st_size} bytes", f"over {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise UnsupportedConfigError("config.json", str(path), f"is not valid JSON: {str(error)[:120]}") from None
    if not isinstance(raw, dict):
        raise UnsupportedConfigError("config.json", type(raw).__name__, "must hold a JSON object")
    for field, bound in CONFIG_BOUNDS.items():
        value = raw.get(field)
        if value is None and field in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound:
            raise UnsupportedConfigError(field, value, f"must be a whole number from 1 to {bound}")
    return raw


def load_hf_config(model_dir: str | Path) -> transformers.PretrainedConfig:
    """config.json through AutoConfig, once its sizes are checked: no remote code, so only
    transformers' own classes load."""
    check_config_json(Path(model_dir) / "config.json")
    return transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
