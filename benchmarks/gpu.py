"""On a GPU: our JAX Qwen2 vs transformers' PyTorch Qwen2 (bf16, sdpa) on the same random weights of
the Qwen2.5-0.5B architecture, resid_post of all 24 layers; plus parity on the GPU.

Needs only jax (with CUDA), torch, transformers, safetensors and ml_dtypes -- no Beam -- so it runs
on a bare GPU image: `bash benchmarks/gpu.sh [results.json]`.

Throughput is reported twice: the forward alone (torch's outputs stay in GPU memory; ours are
written into pinned host memory by the program itself), and with the activations in host memory as
numpy arrays (what extraction needs: the pipeline writes them to files).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time

import jax
import ml_dtypes
import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

from beam_extract.model.loaded import load_model
from beam_extract.model.embedded import random_tensors
from benchmarks.forward import QWEN25_05B, best_time, flops_per_token, gemm_peak_gflops

SHAPES = "16x512,8x2048,2x8192"
LAYERS = QWEN25_05B["num_hidden_layers"]
# Off a GPU it still runs (slowly): a smoke test of this script before spending GPU time.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TorchQwen2:
    """transformers' model on the GPU with forward hooks keeping every layer's output."""

    def __init__(self, directory: str, dtype: torch.dtype):
        self.model = transformers.Qwen2ForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa").model.to(DEVICE).eval()
        self.captured: list[torch.Tensor] = []
        for layer in self.model.layers:
            layer.register_forward_hook(lambda m, a, out: self.captured.append(out[0] if isinstance(out, tuple) else out))

    @torch.no_grad()
    def layers(self, ids: np.ndarray, to_host: bool) -> list:
        self.captured.clear()
        self.model(input_ids=torch.from_numpy(ids).to(DEVICE))
        out = [_host(h) if to_host else h for h in self.captured]
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A host copy in the tensor's own dtype (bf16 stays 2 bytes, as our outputs are)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return tensor.cpu().numpy()


def parity(directory: str, shape: tuple[int, int]) -> dict:
    """Our float32 and bfloat16 activations on the GPU vs transformers float32 on the GPU (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids = np.random.default_rng(2).integers(0, QWEN25_05B["vocab_size"], size=shape)
    reference = TorchQwen2(directory, torch.float32).layers(ids, to_host=True)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(LAYERS)]
    result = {}
    for dtype in ("float32", "bfloat16"):
        ours = load_model(directory, dtype=dtype).run_with_cache(ids, hooks)
        errors, cosines = [], []
        for layer, ref in enumerate(reference):
            got, ref = ours[hooks[layer]].astype(np.float32), ref.astype(np.float32)
            errors.append(float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max()))))
            cosines.append(float((np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))).min()))
        result[dtype] = {"max_rel_error": max(errors), "min_token_cosine": min(cosines)}
    return result


def throughput(directory: str, shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    torch_model = TorchQwen2(directory, torch.bfloat16)
    ours = load_model(directory, dtype="bfloat16")
    hooks = tuple((layer, "resid_post") for layer in range(LAYERS))
    config = transformers.Qwen2Config(**QWEN25_05B)
    rows = []
    for batch, seq in shapes:
        ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(batch, seq)).astype(np.int32)
        positions = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape)
        segments = np.ones_like(ids)
        compile_start = time.perf_counter()
        executable, _ = ours.compiled(ids.shape, hooks, np.dtype(ml_dtypes.bfloat16))
        compile_s = time.perf_counter() - compile_start
        args = [jax.device_put(a) for a in (ids, positions, segments)]

        def ours_on_device():
            jax.block_until_ready(executable(ours.params, *args))

        def ours_to_host():
            ours.forward(ids, positions, segments, hooks, np.dtype(ml_dtypes.bfloat16))

        tokens = batch * seq
        row = {"batch": batch, "seq": seq, "compile_s": compile_s,
               "torch_bf16_device_tok_s": tokens / best_time(lambda: torch_model.layers(ids, False), repeats),
               "torch_bf16_host_tok_s": tokens / best_time(lambda: torch_model.layers(ids, True), repeats),
               "ours_bf16_device_tok_s": tokens / best_time(ours_on_device, repeats),
               "ours_bf16_host_tok_s": tokens / best_time(ours_to_host, repeats)}
        row["ratio_device"] = row["ours_bf16_device_tok_s"] / row["torch_bf16_device_tok_s"]
        row["ratio_host"] = row["ours_bf16_host_tok_s"] / row["torch_bf16_host_tok_s"]
        row["ours_device_tflops"] = row["ours_bf16_device_tok_s"] * flops_per_token(config, seq) / 1e12
        rows.append(row)
        print(f"B={batch} S={seq}: on GPU ours {row['ours_bf16_device_tok_s']:,.0f} tok/s vs torch "
              f"{row['torch_bf16_device_tok_s']:,.0f} ({row['ratio_device']:.2f}x, ours "
              f"{row['ours_device_tflops']:.0f} TFLOP/s); to host ours {row['ours_bf16_host_tok_s']:,.0f} vs "
              f"torch {row['torch_bf16_host_tok_s']:,.0f} ({row['ratio_host']:.2f}x); compile {compile_s:.1f} s",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default=SHAPES, help="batch x sequence shapes, e.g. 16x512,8x2048")
    parser.add_argument("--parity_shape", default="2x700")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    results = {"date": datetime.date.today().isoformat(),
               "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "jax_devices": [str(d) for d in jax.devices()],
               "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    results["gemm_peak_tflops"] = gemm_peak_gflops(jax.numpy.bfloat16, 8192 if DEVICE == "cuda" else 512, 10) / 1e3
    print(json.dumps(results), flush=True)
    with tempfile.TemporaryDirectory() as directory:
        config = transformers.Qwen2Config(**QWEN25_05B)
        config.save_pretrained(directory)  # no tokenizer: token ids are random
        save_file(random_tensors(config, seed=0), f"{directory}/model.safetensors", metadata={"format": "pt"})
        results["parity"] = parity(directory, tuple(int(n) for n in args.parity_shape.split("x")))
        print("parity on the GPU:", json.dumps(results["parity"]), flush=True)
        results["throughput"] = throughput(directory, shapes, args.repeats)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
