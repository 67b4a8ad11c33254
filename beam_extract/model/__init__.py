"""Decoder models in JAX (Qwen2, Llama 3, Mistral, Qwen3, Gemma 2 and 3, GPT-2):
`loaded.load_model(path_or_name).run_with_cache(input_ids, names)`.

Empty on purpose: the driver's light parts (weights' paths, configs) import their own submodules
without loading JAX through this package."""
