"""The host path against a simulated device: can the pipeline feed an accelerator?

`SimulatedModel` stands in for the model: its forward computes nothing, and its outputs are ready
`computed tokens / rate` seconds after the device is free (an accelerator's queue), so the CPU does
only the host's work. Widths are Qwen2.5-0.5B's (d_model 896), output bfloat16.
- encode + write: the fused extract -> write stage (ExtractDoFn and WriteShards, as a runner calls
  them, bundles of 16 batches) with an instantly ready device: token-hooks per CPU-second for 1, 4
  and 24 hooks, on local disk.
- overlap: the same stage with the device's rate set to the stage's own host rate R (so host and
  device each need the same time): real rate / R, with one batch in flight as the pipeline runs it,
  and synchronously (a bundle per batch: every batch finished before the next is dispatched).
- whole host path: a Beam job (read, parse, tokenize, batch, extract, write, manifest) with an
  instant device, in a subprocess: token-hooks per CPU-second of the job, start-up excluded.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import transformers
from apache_beam.transforms.window import GlobalWindow

from beam_extract.batching import form_batches
from beam_extract.extract import ExtractDoFn
from beam_extract.model.embedded import write_random_checkpoint
from beam_extract.output.writer import WriteShards
from beam_extract.tokenize import Sample
from benchmarks.forward import QWEN25_05B
from benchmarks.padding import web_text_like
from benchmarks.report import Figure

D_MODEL = 896
ROWS, ROW_LENGTH = 8, 2048
BUNDLE = 16  # batches per bundle


class SimulatedForward:
    def __init__(self, activations: dict, norms: dict, rows: int | None, ready: float):
        self._outputs, self.rows, self.ready = (activations, norms), rows, ready
        self.compile_seconds, self.compile_cached, self.dispatched = 0.0, False, time.perf_counter()

    def fetch(self):
        time.sleep(max(0.0, self.ready - time.perf_counter()))
        activations, norms = self._outputs
        return ({h: v[: self.rows] for h, v in activations.items()}, {h: v[: self.rows] for h, v in norms.items()})


class SimulatedModel:
    """Model.dispatch's contract; outputs are fixed random buffers (as pinned host buffers would be)."""

    def __init__(self, rate: float = float("inf"), width: int = D_MODEL):
        self._width = width
        self.mesh = types.SimpleNamespace(shape={"data": 1}, devices=np.array([types.SimpleNamespace(platform="sim")]))
        self.rate, self._free, self._buffers = rate, 0.0, {}

    def dispatch(self, tokens, positions, segment_ids, hooks, out_dtype=np.float32, rows=None):
        now = time.perf_counter()
        self._free = max(now, self._free) + tokens.size / self.rate
        key = (tokens.shape, np.dtype(out_dtype).name)
        if key not in self._buffers:
            rng = np.random.default_rng(0)
            values = rng.standard_normal((*tokens.shape, self._width), np.float32).astype(out_dtype)
            self._buffers[key] = values, rng.uniform(100, 200, tokens.shape).astype(np.float32)
        values, norms = self._buffers[key]
        return SimulatedForward({h: values for h in hooks}, {h: norms for h in hooks}, rows, self._free)


def text_batches(count: int) -> list:
    """`count` full packed batches of ROWS x ROW_LENGTH from web-text-like sample lengths."""
    rng = np.random.default_rng(0)
    samples, batches = [], []
    while len(batches) < count:
        n = int(np.clip(rng.lognormal(np.log(600), 1.0), 20, ROW_LENGTH))
        samples.append(Sample(f"web.jsonl:{len(samples) + 1}#w0", rng.integers(0, 151643, n).astype(np.int32),
                              "web.jsonl", len(samples) + 1))
        if len(samples) % 64 == 0:
            made, samples = form_batches(samples, ROW_LENGTH, ROWS, pack=True, final=False)
            batches += made
    return batches[:count]


def run_stage(batches: list, hooks: int, rate: float, output: str, overlap: bool = True) -> dict:
    """The extract -> write stage over `batches`: wall and CPU seconds."""
    hook_list = tuple((layer, "resid_post") for layer in range(hooks))
    extract = ExtractDoFn("sim", "bfloat16", "auto", hook_list, "bfloat16")
    extract._model = SimulatedModel(rate)
    writer = WriteShards(output, hook_list, shard_bytes=256 << 20)
    writer.setup()
    per_bundle = BUNDLE if overlap else 1
    wall, cpu = time.perf_counter(), time.process_time()
    def write(outputs):  # as a runner does with a fused stage: each output written as it is yielded
        for out in outputs:
            if not hasattr(out, "tag"):
                list(writer.process(out.value, window=GlobalWindow()))

    for first in range(0, len(batches), per_bundle):
        extract.start_bundle()
        writer.start_bundle()
        for batch in batches[first:first + per_bundle]:
            write(extract.process(batch, timestamp=0, window=GlobalWindow()))
        write(extract.finish_bundle())
        list(writer.finish_bundle())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    writer.teardown()
    real = sum(b.real_tokens for b in batches)
    return {"wall": wall, "cpu": cpu, "real_tokens": real, "computed_tokens": sum(b.tokens.size for b in batches)}


JOB = """
import json, sys, time
import beam_extract.extract as extract
from benchmarks.host import SimulatedModel
extract.load_model = lambda *args: SimulatedModel()
from beam_extract.pipeline import run
wall, cpu = time.perf_counter(), time.process_time()
run(sys.argv[1:])
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""


def run_job(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", JOB, *args], capture_output=True, text=True, check=False,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    job = json.loads(out.stdout.strip().splitlines()[-1])
    output = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
    return {**job, "manifest": json.loads((Path(output) / "manifest.json").read_text())}


def measure(quick: bool) -> tuple[list[Figure], dict]:
    figures, raw = [], {}
    batches = text_batches(16 if quick else 48)
    with tempfile.TemporaryDirectory() as tmp:
        for hooks in (1, 4, 24):
            # About the same bytes for each: many GB would measure the disk's writeback, not the host.
            some = batches[:max(2, len(batches) * 4 // max(hooks, 4))]
            tokens = sum(b.real_tokens for b in some)
            run = run_stage(some, hooks, float("inf"), f"{tmp}/h{hooks}")
            raw[f"encode_write_{hooks}"] = run
            rate = tokens * hooks / run["cpu"]
            figures.append(Figure("host", f"encode + write, {hooks} hook(s), d=896 bf16, local disk",
                                  f"{rate:,.0f} token-hooks per CPU-second ({tokens * hooks / run['wall']:,.0f} per "
                                  f"wall-second, {run['cpu'] / run['wall']:.2f} cores busy)", rate, ">= 500000"))
            subprocess.run(["rm", "-rf", f"{tmp}/h{hooks}"], check=True)
        hooks = 4
        alone = raw[f"encode_write_{hooks}"]
        rate = alone["computed_tokens"] / alone["wall"]  # the stage's host rate, in computed tokens/s
        for overlap in (True, False):
            run = run_stage(batches, hooks, rate, f"{tmp}/o{overlap}", overlap)
            raw[f"overlap_{overlap}"] = {**run, "device_rate": rate}
            ratio = run["computed_tokens"] / run["wall"] / rate
            figures.append(Figure(
                "host", f"{hooks} hooks, device as fast as the host: real rate / device rate, "
                        f"{'one batch in flight' if overlap else 'synchronous (for comparison)'}",
                f"{run['computed_tokens'] / run['wall']:,.0f} vs {rate:,.0f} computed tok/s", ratio,
                ">= 0.85" if overlap else ""))
            subprocess.run(["rm", "-rf", f"{tmp}/o{overlap}"], check=True)

        model_dir = Path(tmp) / "model"
        write_random_checkpoint(model_dir, transformers.Qwen2Config(
            **{**QWEN25_05B, "num_hidden_layers": 4, "intermediate_size": 64}), 0)
        docs = 30 if quick else 300
        web_text_like(Path(tmp) / "web.jsonl", docs)
        (Path(tmp) / "one.jsonl").write_text((Path(tmp) / "web.jsonl").read_text().splitlines()[0] + "\n")
        common = [f"--model={model_dir}", "--input_format=text", "--output_dtype=bfloat16", "--dtype=bfloat16",
                  "--layers=all", "--max_seq_len=2048"]
        one = run_job([f"--input={tmp}/one.jsonl", f"--output={tmp}/one", *common])
        job = run_job([f"--input={tmp}/web.jsonl", f"--output={tmp}/web", *common])
        real = job["manifest"]["batching"]["real_tokens"]
        token_hooks = real * 4
        cpu = job["cpu"] - one["cpu"]
        raw["job"] = {"job": {k: job[k] for k in ("wall", "cpu")}, "one_line": {k: one[k] for k in ("wall", "cpu")},
                      "real_tokens": real}
        figures.append(Figure("host", "whole host path (read to write), 4 hooks, instant device",
                              f"{token_hooks / cpu:,.0f} token-hooks per CPU-second ({real} tokens; a one-line job's "
                              f"{one['cpu']:.1f} CPU-s of start-up excluded)", token_hooks / cpu, ">= 300000"))
    raw["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures, raw
