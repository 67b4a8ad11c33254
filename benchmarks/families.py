"""Forward throughput per model family: our JAX decoder vs transformers' PyTorch model on the same
random checkpoint, one mid-size architecture per family with fewer layers (the layers are a scan:
per-layer cost is what differs), resid_post of every layer to the host, float32, B=2 S=512.
Vocabularies are cut to 32k rows: the embedding lookup is not where the time goes, and a 128k-row
float32 table would only cost memory."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

from beam_extract.model.embedded import write_random_checkpoint
from beam_extract.model.loaded import load_model
from benchmarks.forward import best_time
from benchmarks.report import Figure

VOCAB = 32000
# family -> (shapes of, config class, the architecture with `layers` layers)
ARCHITECTURES = {
    "llama": ("Llama-3.2-1B", transformers.LlamaConfig, dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072)),
    "mistral": ("Mistral-7B width halved", transformers.MistralConfig, dict(
        hidden_size=2048, intermediate_size=7168, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        sliding_window=4096, max_position_embeddings=32768)),
    "qwen2": ("Qwen2.5-1.5B", transformers.Qwen2Config, dict(
        hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
        rope_theta=1000000.0, max_position_embeddings=32768)),
    "qwen3": ("Qwen3-1.7B", transformers.Qwen3Config, dict(
        hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rope_theta=1000000.0, max_position_embeddings=40960)),
    "gemma2": ("Gemma-2-2B", transformers.Gemma2Config, dict(
        hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        max_position_embeddings=8192)),
    "gemma3_text": ("Gemma-3-1B", transformers.Gemma3TextConfig, dict(
        hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=512, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        max_position_embeddings=32768)),
    "gpt2": ("GPT-2 medium", transformers.GPT2Config, dict(n_embd=1024, n_head=16, n_positions=1024)),
}
BATCH, SEQ = 2, 512


def _config(family: str, layers: int) -> transformers.PretrainedConfig:
    _, config_class, fields = ARCHITECTURES[family]
    return config_class(vocab_size=VOCAB, num_hidden_layers=layers, **fields)


def measure(quick: bool) -> tuple[list[Figure], dict]:
    repeats, layers = (1, 2) if quick else (3, 4)
    figures, raw = [], {}
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape)
    segments = np.ones_like(ids)
    for family, (shapes, _, _) in ARCHITECTURES.items():
        with tempfile.TemporaryDirectory() as directory:
            config = _config(family, layers)
            write_random_checkpoint(Path(directory), config, seed=0)
            ours = load_model(directory, dtype="float32")
            reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        hooks = tuple((layer, "resid_post") for layer in range(layers))
        body = reference.base_model

        def run_torch():
            with torch.no_grad():
                out = body(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
            return [h.numpy() for h in out.hidden_states[1:]]

        def run_ours():
            return ours.forward(ids, positions, segments, hooks)

        times = {"ours": [], "transformers": []}
        run_ours(), run_torch()  # compile, warm up
        for _ in range(repeats):  # interleaved
            times["ours"].append(best_time(run_ours, 1))
            times["transformers"].append(best_time(run_torch, 1))
        tokens = BATCH * SEQ
        row = {name: tokens / float(np.median(t)) for name, t in times.items()}
        raw[family] = {"architecture": shapes, "layers": layers, **row}
        figures.append(Figure("families", f"{family} ({shapes} shapes, {layers} layers) fp32 vs transformers fp32",
                              f"{row['ours']:,.0f} vs {row['transformers']:,.0f} tok/s (B={BATCH} S={SEQ}, medians "
                              f"of {repeats})", row["ours"] / row["transformers"], ""))
    return figures, raw
