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

from beam_extract.model.checkpoint_tensors import expected_shapes, stored_params
from beam_extract.model.families import FAMILIES
from beam_extract.model.hf_config import config_from_hf
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


def random_tensors(hf: transformers.PretrainedConfig, seed: int) -> dict[str, np.ndarray]:
    """Checkpoint-named float32 tensors for `hf` (any family), drawn from a seeded generator in the
    family table's order: embeddings N(0, 1), norms 1 + N(0, 0.1), biases N(0, 0.02), weights
    N(0, 1/fan_in)."""
    config = config_from_hf(hf)
    rng = np.random.default_rng(seed)
    shapes, prefix = expected_shapes(config), FAMILIES[config.family].prefix
    tensors = {}
    # The final norm last, after the layers, as the first embedded checkpoint was drawn.
    order = sorted(stored_params(config), key=lambda entry: entry[0].startswith("final_norm"))
    for name, _, stored, key in order:
        if prefix + key in tensors:  # a fused tensor, drawn whole at its first part
            continue
        shape = shapes[key]
        if name in ("embed", "pos_embed"):
            scale, offset = 1.0, 0.0
        elif "norm" in name:
            scale, offset = (0.02, 0.0) if name.endswith("_b") else (0.1, 1.0)
        elif name.endswith("_b"):
            scale, offset = 0.02, 0.0
        else:
            scale, offset = shape[-1 if stored.transpose else 0] ** -0.5, 0.0
        tensors[prefix + key] = (rng.standard_normal(shape) * scale).astype(np.float32) + np.float32(offset)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = (rng.standard_normal((config.vocab_size, config.hidden_size)) * 0.02).astype(
            np.float32)
    return tensors


def write_random_checkpoint(directory: Path, config: transformers.PretrainedConfig, seed: int) -> None:
    """config.json + model.safetensors + Qwen2.5 tokenizer files into `directory` (any family: its
    token ids are Qwen2.5's, so the vocabulary must cover them)."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file(random_tensors(config, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(directory)


def ensure_embedded_model(name: str, cache: Path) -> Path:
    """The embedded checkpoint's directory in the model cache `cache`, generating it atomically if
    absent."""
    version, overrides, seed = EMBEDDED_MODELS[name]
    target = cache / f"{name}-{version}"
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
