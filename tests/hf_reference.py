"""Reference activations from transformers' PyTorch models on random tiny checkpoints of each family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from beam_extract.hooks import hook_name

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "mlp_in", "z", "mlp_post")

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True)
# family -> (config class, model class, defaults): tiny, odd head counts and GQA where the family has it.
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, COMMON),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              COMMON | dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                            rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                COMMON | dict(num_attention_heads=5, num_key_value_heads=1, head_dim=16, sliding_window=5)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              COMMON | dict(num_attention_heads=3, num_key_value_heads=1, head_dim=32)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               COMMON | dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, head_dim=24,
                             query_pre_attn_scalar=32, sliding_window=5, attn_logit_softcapping=2.0,
                             final_logit_softcapping=30.0)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    COMMON | dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=6, rope_theta=1000000.0,
                                  rope_local_base_freq=10000.0,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=512, n_embd=60, n_head=5, n_layer=3, n_positions=512, bos_token_id=0, eos_token_id=0)),
}


def random_hf_checkpoint(directory: Path, seed: int = 0, family: str = "qwen2",
                         **overrides) -> transformers.PreTrainedModel:
    """A model of `family` with every parameter random (biases and norms too), saved as safetensors."""
    config_class, model_class, defaults = FAMILIES[family]
    config = config_class(**{**defaults, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or (".ln_" in name and name.endswith(".weight")):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(("embed_tokens.weight", "wte.weight")):
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5 if param.ndim == 2 else 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def site_modules(layer: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Where each inner site is in a block: (module, "out" for its output or "in" for its input).
    Gemma's attn_out and mlp_out are what is added to the residual: the outputs of the norms after
    each sublayer; its mlp_in is the output of the norm before the MLP (pre_feedforward_layernorm).
    z is the output projection's input, mlp_post the down projection's."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2 and 3
        return {"attn_out": (layer.post_attention_layernorm, "out"),
                "resid_mid": (layer.pre_feedforward_layernorm, "in"),
                "mlp_out": (layer.post_feedforward_layernorm, "out"),
                "mlp_in": (layer.pre_feedforward_layernorm, "out"),
                "z": (layer.self_attn.o_proj, "in"), "mlp_post": (layer.mlp.down_proj, "in")}
    if hasattr(layer, "ln_2"):  # GPT-2
        return {"attn_out": (layer.attn, "out"), "resid_mid": (layer.ln_2, "in"), "mlp_out": (layer.mlp, "out"),
                "mlp_in": (layer.ln_2, "out"), "z": (layer.attn.c_proj, "in"), "mlp_post": (layer.mlp.c_proj, "in")}
    return {"attn_out": (layer.self_attn, "out"), "resid_mid": (layer.post_attention_layernorm, "in"),
            "mlp_out": (layer.mlp, "out"), "mlp_in": (layer.post_attention_layernorm, "out"),
            "z": (layer.self_attn.o_proj, "in"), "mlp_post": (layer.mlp.down_proj, "in")}


def hf_activations(model: transformers.PreTrainedModel, input_ids: np.ndarray,
                   lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every site of every layer, captured with forward hooks on the decoder modules."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, value):
        captured[name] = (value[0] if isinstance(value, tuple) else value).detach()

    base = model.base_model
    for index, layer in enumerate(base.layers if hasattr(base, "layers") else base.h):
        handles += [
            layer.register_forward_pre_hook(
                lambda m, args, kwargs, n=hook_name(index, "resid_pre"): keep(
                    n, args[0] if args else kwargs["hidden_states"]), with_kwargs=True),
            layer.register_forward_hook(lambda m, a, out, n=hook_name(index, "resid_post"): keep(n, out)),
        ]
        for site, (module, where) in site_modules(layer).items():
            if where == "in":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, n=hook_name(index, site): keep(n, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, a, out, n=hook_name(index, site): keep(n, out)))
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None
    if lengths is not None:
        mask = (torch.arange(ids.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]).long()
    try:
        with torch.no_grad():
            base(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.float().numpy() for name, value in captured.items()}
