"""Forward throughput: our JAX Qwen2 vs transformers' PyTorch Qwen2 on the same random weights.

Both run the Qwen2.5-0.5B architecture in one process and return resid_post of every layer;
figures are ratios against the PyTorch run and against the machine's measured fp32 GEMM peak.

    python -m benchmarks.forward [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from beam_extract.model import load_model

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SHAPES = ((4, 256), (2, 1024))


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_peak_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax_s = best_time(lambda: matmul(a).block_until_ready(), repeats)
    t = torch.from_numpy(np.asarray(a))
    torch_s = best_time(lambda: t @ t, repeats)
    flops = 2 * n**3
    return {"jax": flops / jax_s / 1e9, "torch": flops / torch_s / 1e9}


def flops_per_token(config: transformers.Qwen2Config, seq: int) -> float:
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = d // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f  # q, o, k, v, gate/up/down weights
    return 2 * layers * per_layer + 2 * layers * seq * d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3

    config = transformers.Qwen2Config(**QWEN25_05B)
    torch.manual_seed(0)
    checkpoint = transformers.Qwen2ForCausalLM(config).eval()
    reference = checkpoint.model  # no LM head: neither side computes logits
    with tempfile.TemporaryDirectory() as directory:
        checkpoint.save_pretrained(directory, safe_serialization=True)
        ours = {dtype: load_model(directory, dtype=dtype) for dtype in ("float32", "bfloat16")}

    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(config.num_hidden_layers)]
    peak = gemm_peak_gflops()
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "gemm_peak_gflops": peak, "shapes": []}
    print(f"fp32 GEMM peak: jax {peak['jax']:.0f} GFLOP/s, torch {peak['torch']:.0f} GFLOP/s")
    for batch, seq in SHAPES:
        ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(batch, seq))
        tokens = batch * seq

        def run_torch():
            with torch.no_grad():
                out = reference(input_ids=torch.from_numpy(ids), output_hidden_states=True)
            return [h.numpy() for h in out.hidden_states[1:]]

        row = {"batch": batch, "seq": seq,
               "torch_fp32_tok_s": tokens / best_time(run_torch, repeats)}
        for dtype, model in ours.items():
            row[f"ours_{dtype}_tok_s"] = tokens / best_time(lambda m=model: m.run_with_cache(ids, hooks), repeats)
        row["ratio_fp32"] = row["ours_float32_tok_s"] / row["torch_fp32_tok_s"]
        row["ratio_bf16"] = row["ours_bfloat16_tok_s"] / row["torch_fp32_tok_s"]
        row["mfu_fp32"] = row["ours_float32_tok_s"] * flops_per_token(config, seq) / 1e9 / max(peak.values())
        results["shapes"].append(row)
        print(f"B={batch} S={seq}: torch fp32 {row['torch_fp32_tok_s']:.0f} tok/s | ours fp32 "
              f"{row['ours_float32_tok_s']:.0f} tok/s ({row['ratio_fp32']:.2f}x, {row['mfu_fp32']:.0%} of peak) | "
              f"ours bf16 {row['ours_bfloat16_tok_s']:.0f} tok/s ({row['ratio_bf16']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
