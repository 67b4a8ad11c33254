"""The pipeline against its own forward, and its memory against its input size.

1. End-to-end tokens/s of `python -m beam_extract` (FnApiRunner, in process) on web-text-like
   input vs the bare compiled forward on the same batch shapes, on a 4-layer model with the
   Qwen2.5-0.5B widths (random weights).
2. Peak RSS of the whole job at 1x and 10x the input.

    python -m benchmarks.pipeline [--docs 150]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers

from benchmarks.forward import QWEN25_05B
from benchmarks.padding import web_text_like

MEASURE = """
import json, resource, sys, time
from beam_extract.pipeline import run
start = time.perf_counter()
run(sys.argv[1:])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_job(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=150)
    args = parser.parse_args()
    from beam_extract.model import load_model
    from beam_extract.model.embedded import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_checkpoint(tmp / "model", transformers.Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": 4}), 0)
        web_text_like(tmp / "x1.jsonl", args.docs)
        web_text_like(tmp / "x10.jsonl", 10 * args.docs, seed=1)
        common = [f"--model={tmp / 'model'}", "--input_format=text", "--max_seq_len=1024", "--batch_size=4",
                  "--layers=3", "--output_dtype=bfloat16"]
        job = run_job([f"--input={tmp / 'x1.jsonl'}", f"--output={tmp / 'out1'}", *common])
        manifest = json.loads((tmp / "out1/manifest.json").read_text())
        batching = manifest["batching"]

        model = load_model(str(tmp / "model"))
        shape = (4, 1024)
        tokens = np.random.default_rng(0).integers(0, 150000, shape).astype(np.int32)
        positions = np.broadcast_to(np.arange(1024, dtype=np.int32), shape)
        segments = np.ones(shape, np.int32)
        model.forward(tokens, positions, segments, ((3, "resid_post"),))  # compile
        start = time.perf_counter()
        for _ in range(batching["batches"]):
            model.forward(tokens, positions, segments, ((3, "resid_post"),))
        forward_seconds = time.perf_counter() - start
        forward_rate = batching["computed_tokens"] / forward_seconds
        pipeline_rate = batching["real_tokens"] / job["seconds"]
        print(f"pipeline: {batching['real_tokens']} real tokens ({batching['real_over_computed']:.3f} of computed) "
              f"in {job['seconds']:.1f} s = {pipeline_rate:.0f} tok/s end to end (incl. start, load, compile)")
        print(f"bare forward, same {batching['batches']} batches of {shape}: {forward_rate:.0f} computed tok/s; "
              f"ratio pipeline/forward {pipeline_rate / forward_rate:.2f} "
              f"(real tokens only: {batching['real_tokens'] / forward_seconds:.0f} tok/s -> "
              f"{pipeline_rate / (batching['real_tokens'] / forward_seconds):.2f})")

        big = run_job([f"--input={tmp / 'x10.jsonl'}", f"--output={tmp / 'out10'}", *common])
        print(f"peak RSS: {job['peak_rss_mib']:.0f} MiB at 1x ({args.docs} docs), {big['peak_rss_mib']:.0f} MiB at "
              f"10x (+{100 * (big['peak_rss_mib'] / job['peak_rss_mib'] - 1):.0f}%)")


if __name__ == "__main__":
    main()
