"""`tiny-random-qwen2`: a small Qwen2 checkpoint generated on first use, so the default job runs offline.

It is a real Hugging Face checkpoint (config.json via transformers' Qwen2Config, model.safetensors,
the real Qwen2.5 tokenizer), with deterministic random weights: every machine generates the same
bytes, so workers that each generate it agree.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import transformers
from safetensors.numpy import save_file

from beam_extract.model.qwen_tokenizer_files import write_tokenizer_files

TINY_QWEN2_CONFIG = dict(
    vocab_size=151936,  # Qwen2.5's embedding rows (151,665 tokens, padded)
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=151643,
    eos_token_id=151645,
)
# Bump when the generated files change, so stale caches are not reused.
EMBEDDED_MODELS = {"tiny-random-qwen2": ("v1", TINY_QWEN2_CONFIG, 20261125)}


def random_qwen2_tensors(config: transformers.Qwen2Config, seed: int) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 tensors for `config`, drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    d, f = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd

    def normal(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm_weight():
        return (1.0 + normal(d, scale=0.1)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(config.vocab_size, d, scale=1.0)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": norm_weight(),
            p + "self_attn.q_proj.weight": normal(q, d, scale=d**-0.5),
            p + "self_attn.q_proj.bias": normal(q),
            p + "self_attn.k_proj.weight": normal(kv, d, scale=d**-0.5),
            p + "self_attn.k_proj.bias": normal(kv),
            p + "self_attn.v_proj.weight": normal(kv, d, scale=d**-0.5),
            p + "self_attn.v_proj.bias": normal(kv),
            p + "self_attn.o_proj.weight": normal(d, q, scale=q**-0.5),
            p + "post_attention_layernorm.weight": norm_weight(),
            p + "mlp.gate_proj.weight": normal(f, d, scale=d**-0.5),
            p + "mlp.up_proj.weight": normal(f, d, scale=d**-0.5),
            p + "mlp.down_proj.weight": normal(d, f, scale=f**-0.5),
        })
    tensors["model.norm.weight"] = norm_weight()
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = normal(config.vocab_size, d)
    return tensors


def write_random_checkpoint(directory: Path, config: transformers.Qwen2Config, seed: int) -> None:
    """config.json + model.safetensors + Qwen2.5 tokenizer files into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file(random_qwen2_tensors(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(directory)


def ensure_embedded_model(name: str) -> Path:
    """The embedded checkpoint's directory in the cache, generating it atomically if absent."""
    from beam_extract.model.weights import cache_dir

    version, overrides, seed = EMBEDDED_MODELS[name]
    target = cache_dir() / f"{name}-{version}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_random_checkpoint(staging, transformers.Qwen2Config(**overrides), seed)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
