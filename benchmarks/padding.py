"""Real / computed tokens of the pipeline's batching, on a web-text-like length distribution and on
the ARC sample tasks, read from each run's manifest.

    python -m benchmarks.padding [--docs 1500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from beam_extract.options import sample_input
from beam_extract.pipeline import run

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def web_text_like(path: Path, docs: int, seed: int = 0) -> list[int]:
    """Log-normal lengths, median ~600 tokens, long tail (some past 8k, split into windows)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, docs).astype(int), 20, 20000)
    with open(path, "w") as handle:
        for i, n in enumerate(lengths):
            handle.write(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(WORDS, n))}) + "\n")
    return lengths.tolist()


def efficiency(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run(args + [f"--output={out}", "--layers=0"])
        return json.loads((Path(out) / "manifest.json").read_text())["batching"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=1500)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "web.jsonl"
        lengths = web_text_like(text, args.docs)
        print(f"web-text-like: {args.docs} docs, median {int(np.median(lengths))} words, max {max(lengths)}")
        for label, extra in [("text, packing (default)", []), ("text, buckets only", ["--packing=off"])]:
            results[label] = efficiency([f"--input={text}", "--input_format=text", *extra])
    arc = str(Path(sample_input()).parent / "sample_arc.jsonl")
    for label, extra in [("ARC sample, buckets multiples:128 (default)", []),
                         ("ARC sample, buckets multiples:32", ["--buckets=multiples:32"]),
                         ("ARC sample, packed (--packing=all)", ["--packing=all"])]:
        results[label] = efficiency([f"--input={arc}", "--input_format=arc", *extra])
    for label, b in results.items():
        print(f"{label}: real/computed {b['real_over_computed']:.3f} over {b['batches']} batches, "
              f"{b['compilations']} compilations for row lengths {b['row_lengths']}")


if __name__ == "__main__":
    main()
