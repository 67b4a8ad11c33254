"""The pipeline against its own forward, its scaling over workers, and its memory against input size.

Jobs run `beam_extract.pipeline.run` in a subprocess (FnApiRunner), on a 4-layer model with the
Qwen2.5-0.5B widths (random weights), for web-text-like input and for ARC tasks. The baseline is the
bare compiled forward on the same batch shapes, in the same run: pipeline/forward = forward seconds
for the job's batches / the job's wall seconds (start-up, model load and compiles included).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers

from beam_extract.format.schema import OUTPUT_DTYPES
from beam_extract.model.embedded import write_random_checkpoint
from beam_extract.model.loaded import load_model
from beam_extract.model.loaded import Model
from beam_extract.options import sample_input
from benchmarks.forward import QWEN25_05B
from benchmarks.padding import web_text_like
from benchmarks.report import Figure

# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a child of a large process (this
# harness holds a 0.5B model) would report its parent's peak.
MEASURE = """
import json, re, sys, time
from beam_extract.pipeline import run
start = time.perf_counter()
run(sys.argv[1:])
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": peak_kib / 1024}))
"""
LAYER = 3  # the model's last layer: every layer runs


def run_job(args: list[str]) -> dict:
    """One job in a fresh process: its wall seconds, peak RSS and manifest."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    job = json.loads(out.stdout.strip().splitlines()[-1])
    output = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
    return {**job, "manifest": json.loads((Path(output) / "manifest.json").read_text())}


def bare_forward_seconds(model: Model, batch_shapes: dict[str, int]) -> float:
    """The compiled forward alone over the same number of batches of each shape (compiled first),
    one document per row (so no tile is skipped: packed rows skip the tiles between documents)."""
    seconds = 0.0
    for shape, count in batch_shapes.items():
        rows, length = map(int, shape.split("x"))
        tokens = np.random.default_rng(0).integers(0, 150000, (rows, length)).astype(np.int32)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        segments = np.ones_like(tokens)
        hooks = ((LAYER, "resid_post"),)
        model.forward(tokens, positions, segments, hooks, OUTPUT_DTYPES["bfloat16"])
        start = time.perf_counter()
        for _ in range(count):
            model.forward(tokens, positions, segments, hooks, OUTPUT_DTYPES["bfloat16"])
        seconds += time.perf_counter() - start
    return seconds


def measure(quick: bool) -> tuple[list[Figure], dict]:
    docs, views = (10, 1) if quick else (300, 128)
    figures, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        write_random_checkpoint(model_dir, transformers.Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": 4}), 0)
        model = load_model(str(model_dir))
        web_text_like(tmp / "x1.jsonl", docs)
        (tmp / "one.jsonl").write_text((tmp / "x1.jsonl").read_text().splitlines()[0] + "\n")
        common = [f"--model={model_dir}", "--max_seq_len=1024", f"--layers={LAYER}", "--output_dtype=bfloat16"]
        text = [f"--input={tmp / 'x1.jsonl'}", "--input_format=text", *common]
        arc = [f"--input={Path(sample_input()).parent / 'sample_arc.jsonl'}", "--input_format=arc",
               f"--views_per_task={views}", *common]
        # The fixed cost of a job (start-up, model load, graph, one compile): a one-line job, less its forward.
        one = run_job([f"--input={tmp / 'one.jsonl'}", "--input_format=text", f"--output={tmp / 'one'}", *common])
        fixed = one["seconds"] - one["manifest"]["batching"]["forward_seconds"]
        raw["fixed_seconds"] = fixed
        for label, args in (("text", text), ("ARC", arc)):
            job = run_job([*args, f"--output={tmp / label}"])
            batching = job["manifest"]["batching"]
            forward = bare_forward_seconds(model, batching["batch_shapes"])
            steady = forward / max(job["seconds"] - fixed, 1e-9)
            raw[label] = {"job_seconds": job["seconds"], "bare_forward_seconds": forward, "batching": batching,
                          "peak_rss_mib": job["peak_rss_mib"]}
            real, inside = batching["real_tokens"], batching["forward_seconds"]
            figures += [
                Figure("pipeline", f"{label}: end to end vs bare forward",
                       f"{real / job['seconds']:.0f} vs {real / forward:.0f} real tok/s ({real} tokens, "
                       f"{job['seconds']:.1f} s)", forward / job["seconds"], ">= 0.9",
                       note=f"its forwards' dispatch-to-host seconds sum to {inside:.1f} s (batches overlap: "
                            f"{inside / job['seconds']:.0%} of its wall time); less the {fixed:.1f} s fixed cost "
                            f"of a job: {steady:.2f}"),
                Figure("compiles", f"{label}: compilations vs batch shapes",
                       f"{batching['compilations']} compilations, {batching['compile_seconds']:.1f} s, for "
                       f"{len(batching['batch_shapes'])} shapes", batching["compilations"] / len(batching["batch_shapes"]),
                       "<= 1"),
            ]
        if not quick:
            two = run_job([*text, f"--output={tmp / 'two'}", "--direct_num_workers=2",
                           "--direct_running_mode=multi_threading"])
            one = raw["text"]["job_seconds"]
            raw["two_workers_seconds"] = two["seconds"]
            figures.append(Figure("scaling", "text: --direct_num_workers=2 vs 1 (threads)",
                                  f"{two['seconds']:.1f} s vs {one:.1f} s", one / two["seconds"], "",
                                  note="JAX already uses both cores inside each forward"))
            web_text_like(tmp / "tenth.jsonl", docs // 10, seed=1)
            tenth = run_job([f"--input={tmp / 'tenth.jsonl'}", "--input_format=text", *common,
                             f"--output={tmp / 'tenth'}"])
            big = raw["text"]["peak_rss_mib"]
            raw["tenth_peak_rss_mib"] = tenth["peak_rss_mib"]
            figures.append(Figure("memory", f"text through the model: {docs} vs {docs // 10} docs",
                                  f"peak RSS {big:.0f} vs {tenth['peak_rss_mib']:.0f} MiB",
                                  big / tenth["peak_rss_mib"] - 1, "< 0.1", note="growth"))
    return figures, raw
