"""Decoder models in JAX (Qwen2, Llama 3, Mistral, Qwen3, Gemma 2 and 3, GPT-2):
`from beam_extract.model import load_model; load_model(path_or_name).run_with_cache(input_ids, names)`.

`load_model` is resolved on first use (PEP 562), so the driver's light parts (weights' paths,
configs) import their own submodules without loading JAX through this package."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from beam_extract.model.loaded import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
