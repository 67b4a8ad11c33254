"""Reference activations from transformers' PyTorch Qwen2 on random tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


def random_hf_checkpoint(directory: Path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A Qwen2ForCausalLM with every parameter random (biases and norms too), saved as safetensors."""
    defaults = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    rms_norm_eps=1e-6, tie_word_embeddings=True)
    config = transformers.Qwen2Config(**{**defaults, **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("embed_tokens.weight"):
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5 if param.ndim == 2 else 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_activations(model: transformers.PreTrainedModel, input_ids: np.ndarray,
                   lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every site of every layer, captured with forward hooks on the decoder modules."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, value):
        captured[name] = (value[0] if isinstance(value, tuple) else value).detach()

    for index, layer in enumerate(model.model.layers):
        prefix = f"blocks.{index}.hook_"
        handles += [
            layer.register_forward_pre_hook(
                lambda m, args, kwargs, p=prefix: keep(p + "resid_pre", args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True),
            layer.register_forward_hook(lambda m, a, out, p=prefix: keep(p + "resid_post", out)),
            layer.self_attn.register_forward_hook(lambda m, a, k, out, p=prefix: keep(p + "attn_out", out),
                                                  with_kwargs=True),
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, args, p=prefix: keep(p + "resid_mid", args[0])),
            layer.mlp.register_forward_hook(lambda m, a, out, p=prefix: keep(p + "mlp_out", out)),
        ]
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None
    if lengths is not None:
        mask = (torch.arange(ids.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]).long()
    try:
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.float().numpy() for name, value in captured.items()}
