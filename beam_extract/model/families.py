"""The model families the decoder computes, each a declarative description.

A family says where each of our parameters is stored in its Hugging Face checkpoints (the one
tensor-name table: loading, checking and the random test checkpoints all read it) and how its
transformers config maps onto `ModelConfig` (norm kind, activation, biases, attention scale,
soft-capping, sliding windows, RoPE, embedding scale), refusing by name what the decoder does not
compute. The decoder itself (decoder.py) has no family names in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import transformers

from beam_extract.model.config import UnsupportedConfigError, hf_rope, layer_windows, read_rope


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where one of our parameters lives in a checkpoint."""

    name: str  # under the layer's prefix (`model.layers.{i}.`), or the model's for whole-model tensors
    transpose: bool = False  # a torch Linear's [out, in]; ours are [in, out]
    part: int = 0  # a fused tensor holds `parts` of ours side by side on its last axis (GPT-2's c_attn)
    parts: int = 1
    when: str | None = None  # a ModelConfig flag: stored only where the config sets it


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    prefix: str  # of the decoder's tensors; a checkpoint may also store them without it
    layers: str  # the stack of blocks under the prefix
    globals: Mapping[str, Stored]
    layer: Mapping[str, Stored]
    read: Callable[[transformers.PretrainedConfig], dict]  # ModelConfig fields beyond the common sizes
    field_names: Mapping[str, str] = dataclasses.field(default_factory=dict)  # config.json's names for sizes
    optional_sizes: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()  # tensors some checkpoints store that no computation reads
    activation_field: str = "hidden_act"


def _linear(name: str, bias: str | None = None) -> dict[str, Stored]:
    """Our `{x}_w` (and `{x}_b` where the config flag `bias` says so) for a torch Linear `name`."""
    ours = name.rsplit(".", 1)[-1].removesuffix("_proj")
    out = {f"{ours}_w": Stored(f"{name}.weight", transpose=True)}
    if bias:
        out[f"{ours}_b"] = Stored(f"{name}.bias", when=bias)
    return out


LLAMA_LAYER = {
    "attn_norm": Stored("input_layernorm.weight"),
    **_linear("self_attn.q_proj", "qkv_bias"), **_linear("self_attn.k_proj", "qkv_bias"),
    **_linear("self_attn.v_proj", "qkv_bias"), **_linear("self_attn.o_proj", "o_bias"),
    "mlp_norm": Stored("post_attention_layernorm.weight"),
    **_linear("mlp.gate_proj", "mlp_bias"), **_linear("mlp.up_proj", "mlp_bias"),
    **_linear("mlp.down_proj", "mlp_bias"),
}
QK_NORMS = {"q_norm": Stored("self_attn.q_norm.weight"), "k_norm": Stored("self_attn.k_norm.weight")}
# Gemma normalises what each sublayer adds to the residual; its pre-MLP norm has another name.
GEMMA_LAYER = {
    **LLAMA_LAYER,
    "attn_post_norm": Stored("post_attention_layernorm.weight"),
    "mlp_norm": Stored("pre_feedforward_layernorm.weight"),
    "mlp_post_norm": Stored("post_feedforward_layernorm.weight"),
}
LLAMA_GLOBALS = {"embed": Stored("embed_tokens.weight"), "final_norm": Stored("norm.weight")}


def _refuse(hf: transformers.PretrainedConfig, field: str, why: str) -> None:
    value = getattr(hf, field, None)
    if value not in (None, False):
        raise UnsupportedConfigError(field, value, why)


def _llama_like(hf: transformers.PretrainedConfig) -> dict:
    theta, scaling = hf_rope(hf)
    return dict(intermediate_size=hf.intermediate_size, rms_norm_eps=float(hf.rms_norm_eps),
                activation=hf.hidden_act, rope_theta=theta, rope_scaling=scaling, qkv_bias=False)


def _full_attention_only(hf: transformers.PretrainedConfig, family: str) -> None:
    _refuse(hf, "use_sliding_window", f"sliding-window attention is not implemented for {family}")
    layer_windows(hf)  # full attention on every layer, or an error naming layer_types


def _read_qwen2(hf: transformers.PretrainedConfig) -> dict:
    _full_attention_only(hf, "Qwen2")
    return _llama_like(hf) | dict(qkv_bias=True)


def _read_llama(hf: transformers.PretrainedConfig) -> dict:
    bias = bool(getattr(hf, "attention_bias", False))
    return _llama_like(hf) | dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf, "mlp_bias", False)))


def _read_mistral(hf: transformers.PretrainedConfig) -> dict:
    return _llama_like(hf) | dict(layer_windows=layer_windows(hf, every_layer=True))


def _read_qwen3(hf: transformers.PretrainedConfig) -> dict:
    _full_attention_only(hf, "Qwen3")
    return _read_llama(hf)


def _read_gemma(hf: transformers.PretrainedConfig, rope: tuple[float, tuple], local_theta: float | None) -> dict:
    _refuse(hf, "use_bidirectional_attention", "only causal attention is implemented")
    theta, scaling = rope
    bias = bool(getattr(hf, "attention_bias", False))
    return dict(intermediate_size=hf.intermediate_size, rms_norm_eps=float(hf.rms_norm_eps),
                activation=hf.hidden_activation, norm="rms_offset", qkv_bias=bias, o_bias=bias,
                attention_scale=float(hf.query_pre_attn_scalar) ** -0.5,
                attn_softcap=float(hf.attn_logit_softcapping) if hf.attn_logit_softcapping else None,
                embed_scale=float(hf.hidden_size) ** 0.5, layer_windows=layer_windows(hf),
                rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)


def _read_gemma2(hf: transformers.PretrainedConfig) -> dict:
    return _read_gemma(hf, hf_rope(hf), None)


def _read_gemma3(hf: transformers.PretrainedConfig) -> dict:
    # Gemma 3 keeps one RoPE per layer type: a local base on sliding layers, scaling only on full ones.
    rope = hf.rope_parameters or {}
    local, _ = read_rope(rope.get("sliding_attention"), getattr(hf, "rope_local_base_freq", None))
    return _read_gemma(hf, read_rope(rope.get("full_attention"), getattr(hf, "rope_theta", None)), local)


def _read_gpt2(hf: transformers.PretrainedConfig) -> dict:
    _refuse(hf, "scale_attn_by_inverse_layer_idx", "per-layer attention scaling is not implemented")
    _refuse(hf, "add_cross_attention", "only decoder-only models are computed")
    return dict(intermediate_size=hf.n_inner or 4 * hf.hidden_size, rms_norm_eps=float(hf.layer_norm_epsilon),
                activation=hf.activation_function, norm="layer", o_bias=True, mlp_bias=True, rope_theta=0.0,
                learned_positions=True, attention_scale=None if hf.scale_attn_weights else 1.0)


def _gpt2_qkv(kind: str) -> dict[str, Stored]:
    return {f"{x}_{kind}": Stored(f"attn.c_attn.{'weight' if kind == 'w' else 'bias'}", part=i, parts=3)
            for i, x in enumerate("qkv")}


FAMILIES = {family.model_type: family for family in (
    Family("qwen2", "model.", "layers", LLAMA_GLOBALS, LLAMA_LAYER, _read_qwen2),
    Family("llama", "model.", "layers", LLAMA_GLOBALS, LLAMA_LAYER, _read_llama),
    Family("mistral", "model.", "layers", LLAMA_GLOBALS, LLAMA_LAYER, _read_mistral),
    Family("qwen3", "model.", "layers", LLAMA_GLOBALS, {**LLAMA_LAYER, **QK_NORMS}, _read_qwen3),
    Family("gemma2", "model.", "layers", LLAMA_GLOBALS, GEMMA_LAYER, _read_gemma2,
           activation_field="hidden_activation"),
    Family("gemma3_text", "model.", "layers", LLAMA_GLOBALS, {**GEMMA_LAYER, **QK_NORMS}, _read_gemma3,
           activation_field="hidden_activation"),
    # Conv1D weights are stored [in, out] already: nothing is transposed.
    Family("gpt2", "transformer.", "h",
           {"embed": Stored("wte.weight"), "pos_embed": Stored("wpe.weight"),
            "final_norm": Stored("ln_f.weight"), "final_norm_b": Stored("ln_f.bias")},
           {"attn_norm": Stored("ln_1.weight"), "attn_norm_b": Stored("ln_1.bias"), **_gpt2_qkv("w"), **_gpt2_qkv("b"),
            "o_w": Stored("attn.c_proj.weight"), "o_b": Stored("attn.c_proj.bias"),
            "mlp_norm": Stored("ln_2.weight"), "mlp_norm_b": Stored("ln_2.bias"),
            "up_w": Stored("mlp.c_fc.weight"), "up_b": Stored("mlp.c_fc.bias"),
            "down_w": Stored("mlp.c_proj.weight"), "down_b": Stored("mlp.c_proj.bias")},
           _read_gpt2,
           field_names={"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embd",
                        "max_position_embeddings": "n_positions", "intermediate_size": "n_inner"},
           optional_sizes=("intermediate_size",), unused=("attn.bias", "attn.masked_bias"),
           activation_field="activation_function"),
)}


def family_of(model_type: object) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedConfigError("model_type", model_type, f"supported model types: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def layer_tensors(config) -> dict[str, Stored]:
    """Our per-layer parameters for this config and where each is stored."""
    family = FAMILIES[config.family]
    return {ours: stored for ours, stored in family.layer.items()
            if stored.when is None or getattr(config, stored.when)}
