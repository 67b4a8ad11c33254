"""Decoder models in JAX (Qwen2, Llama 3, Mistral, Qwen3, Gemma 2 and 3, GPT-2):
`load_model(path_or_name).run_with_cache(input_ids, names)`."""

from beam_extract.model.config import ModelConfig, UnsupportedConfigError
from beam_extract.hooks import hook_name, parse_hook_name
from beam_extract.model.loaded import Model, load_model
from beam_extract.model.weights import CheckpointError

__all__ = [
    "CheckpointError",
    "Model",
    "ModelConfig",
    "UnsupportedConfigError",
    "hook_name",
    "load_model",
    "parse_hook_name",
]
