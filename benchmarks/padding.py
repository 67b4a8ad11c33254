"""Real / computed tokens of the pipeline's batching, read from each run's manifest: web-text-like
lengths with packing (and buckets alone, for comparison), and the ARC sample tasks with buckets."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from beam_extract.options import sample_input
from beam_extract.pipeline import run
from benchmarks.report import Figure

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which").split()


def web_text_like(path: Path, docs: int, seed: int = 0) -> list[int]:
    """Log-normal lengths, median ~600 tokens, long tail (some past 8k, split into windows)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, docs).astype(int), 20, 20000)
    with open(path, "w") as handle:
        handle.writelines(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(WORDS, n))}) + "\n"
                          for i, n in enumerate(lengths))
    return lengths.tolist()


def batching(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run([*args, f"--output={out}", "--layers=0"])
        return json.loads((Path(out) / "manifest.json").read_text())["batching"]


def measure(quick: bool) -> tuple[list[Figure], dict]:
    docs = 150 if quick else 1500
    arc = str(Path(sample_input()).parent / "sample_arc.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "web.jsonl"
        web_text_like(text, docs)
        runs = {
            "web text, packing (default)": ([f"--input={text}", "--input_format=text"], ">= 0.95"),
            "ARC sample, buckets, 8 views per task (default)": ([f"--input={arc}", "--input_format=arc"], ">= 0.9"),
        }
        if not quick:
            runs["web text, buckets only"] = ([f"--input={text}", "--input_format=text", "--packing=off"], "")
            # More samples per bucket: fewer part-empty final batches.
            runs["ARC sample, buckets, 32 views per task"] = (
                [f"--input={arc}", "--input_format=arc", "--views_per_task=32"], ">= 0.9")
        raw = {label: batching(args) for label, (args, _) in runs.items()}
    figures = [Figure("padding", label, f"{b['real_tokens']} real of {b['computed_tokens']} computed tokens, "
                      f"{b['batches']} batches, {b['compilations']} compilations", b["real_over_computed"], target)
               for (label, (_, target)), b in zip(runs.items(), raw.values())]
    return figures, raw
