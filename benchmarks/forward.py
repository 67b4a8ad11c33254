"""Forward throughput: our JAX Qwen2 vs transformers' PyTorch Qwen2 on the same random weights of
the Qwen2.5-0.5B architecture, resid_post of all 24 layers returned to the host (neither side
computes logits). Ratios against the PyTorch run and against the machine's GEMM peak, measured in
the same process; compile seconds of the 24-layer and a 4-layer forward.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from beam_extract.batching import form_batches
from beam_extract.model.loaded import load_model
from beam_extract.tokenize import Sample
from benchmarks.report import Figure

QWEN25_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
# (batch, seq, target ratio vs transformers): the speed issue's targets.
SHAPES = ((4, 256, 1.3), (2, 1024, 1.1), (1, 4096, 1.1))


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_peak_gflops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """JAX's best n^3 matmul rate on this machine (bfloat16 inputs give float32 results)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / best_time(lambda: matmul(a).block_until_ready(), repeats) / 1e9


def flops_per_token(config: transformers.Qwen2Config, seq: int) -> float:
    """Weight matmuls plus causal attention (scores and values over seq/2 keys on average)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = d // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f  # q, o, k, v, gate/up/down weights
    return 2 * layers * per_layer + 2 * layers * seq * d


def measure(quick: bool) -> tuple[list[Figure], dict]:
    repeats = 1 if quick else 3
    shapes = SHAPES[:1] if quick else SHAPES
    config = transformers.Qwen2Config(**QWEN25_05B)
    torch.manual_seed(0)
    checkpoint = transformers.Qwen2ForCausalLM(config).eval()
    reference = checkpoint.model
    with tempfile.TemporaryDirectory() as directory:
        checkpoint.save_pretrained(directory, safe_serialization=True)
        ours = {dtype: load_model(directory, dtype=dtype) for dtype in ("float32", "bfloat16")}
    layers = config.num_hidden_layers
    hooks = tuple((layer, "resid_post") for layer in range(layers))
    peak = {"float32": gemm_peak_gflops(jnp.float32), "bfloat16": gemm_peak_gflops(jnp.bfloat16)}
    raw = {"gemm_peak_gflops": peak, "torch_threads": torch.get_num_threads(), "shapes": []}
    figures = [Figure("forward", "GEMM peak (JAX, 2048^3)", f"fp32 {peak['float32']:.0f} GFLOP/s, bf16 "
                      f"{peak['bfloat16']:.0f} GFLOP/s", note="the MFU denominators")]
    for batch, seq, target in shapes:
        ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(batch, seq)).astype(np.int32)
        positions = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape)
        segments = np.ones_like(ids)
        tokens = batch * seq

        def run_torch(ids=ids):
            with torch.no_grad():
                out = reference(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
            return [h.numpy() for h in out.hidden_states[1:]]

        row = {"batch": batch, "seq": seq, "torch_fp32_tok_s": tokens / best_time(run_torch, repeats)}
        for dtype, model in ours.items():
            _, row[f"compile_s_{dtype}"] = model.compiled(ids.shape, hooks, np.dtype(np.float32))
            row[f"ours_{dtype}_tok_s"] = tokens / best_time(
                lambda m=model, ids=ids, p=positions, s=segments: m.forward(ids, p, s, hooks), repeats)
        flops = flops_per_token(config, seq)
        row["mfu_fp32"] = row["ours_float32_tok_s"] * flops / 1e9 / peak["float32"]
        row["mfu_bf16"] = row["ours_bfloat16_tok_s"] * flops / 1e9 / peak["bfloat16"]
        raw["shapes"].append(row)
        shape = f"B={batch} S={seq}"
        ours32, theirs = row["ours_float32_tok_s"], row["torch_fp32_tok_s"]
        # Held to utilisation of the machine's own measured peak, which holds on any CPU; the ratio to
        # transformers depends on how well PyTorch does on that CPU, so it is reported, not a target.
        figures += [
            Figure("forward", f"{shape} fp32 MFU", f"{ours32 * flops / 1e9:.0f} GFLOP/s of {peak['float32']:.0f}",
                   row["mfu_fp32"], ">= 0.85"),
            Figure("forward", f"{shape} bf16 MFU", f"{row['ours_bfloat16_tok_s'] * flops / 1e9:.0f} GFLOP/s of "
                   f"{peak['bfloat16']:.0f}", row["mfu_bf16"], ">= 0.7"),
            Figure("forward", f"{shape} fp32 vs transformers fp32",
                   f"{ours32:.0f} vs {theirs:.0f} tok/s", ours32 / theirs, "",
                   note=f"the first round's target was {target}"),
            Figure("forward", f"{shape} bf16 vs our fp32", f"{row['ours_bfloat16_tok_s']:.0f} vs {ours32:.0f} tok/s",
                   row["ours_bfloat16_tok_s"] / ours32, ""),
        ]
    first = raw["shapes"][0]
    for row in raw["shapes"][1:]:
        kept = row["mfu_fp32"] / first["mfu_fp32"]
        figures.append(Figure("forward", f"S={row['seq']} FLOP/s vs S={first['seq']} (attention FLOPs counted)",
                              f"{row['mfu_fp32']:.0%} vs {first['mfu_fp32']:.0%} of peak", kept, ">= 0.9"))
    # Compile time: the layers are a scan, so depth should barely matter.
    model = ours["float32"]
    model._compiled.clear()
    shape = (shapes[0][0], shapes[0][1])
    _, full = model.compiled(shape, hooks, np.dtype(np.float32))
    _, shallow = model.compiled(shape, hooks[:4], np.dtype(np.float32))
    raw["compile_s"] = {"24_layers": full, "4_layers": shallow}
    raw["packed_rows"] = long_packed_rows(repeats)
    figures.append(Figure(
        "forward", "packed rows of 500-900-token documents: cost per token at 8x8192 vs 8x1024 (embedded model)",
        f"{raw['packed_rows'][8192]:.1f} vs {raw['packed_rows'][1024]:.1f} us per token",
        raw["packed_rows"][8192] / raw["packed_rows"][1024], "<= 1.2",
        note="a query block's loop over keys starts at its segment"))
    figures += [
        Figure("forward", f"compile, {layers} layers (B={shape[0]} S={shape[1]})", f"{full:.1f} s", full, "< 30"),
        Figure("forward", f"compile, {layers} layers vs 4 layers", f"{full:.1f} s vs {shallow:.1f} s",
               full / shallow, "< 2", note="linear in depth would be 6"),
    ]
    return figures, raw


def long_packed_rows(repeats: int) -> dict[int, float]:
    """Microseconds per computed token of the embedded model's forward on 8 packed rows of 1024 and
    of 8192 tokens (documents of 500-900 tokens): attention work per token is the same, so any
    difference is the cost of visiting (and skipping) tiles."""
    rng = np.random.default_rng(0)
    model = load_model("tiny-random-qwen2", "float32")
    hooks = ((model.config.num_layers - 1, "resid_post"),)
    cost = {}
    for length in (1024, 8192):
        samples = []
        while sum(len(s.token_ids) for s in samples) < 8 * length:
            n = int(rng.integers(500, 900))
            samples.append(Sample(f"d{len(samples)}", rng.integers(1, 1000, n).astype(np.int32), "x", 1))
        (batch, *_), _ = form_batches(samples, length, 8, pack=True, final=True)
        seconds = best_time(lambda b=batch: model.forward(b.tokens, b.positions, b.segment_ids, hooks), repeats)
        cost[length] = seconds / batch.tokens.size * 1e6
    return cost
