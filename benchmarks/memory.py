"""Peak memory of the job at 1x and 10x the input lines (all dead-lettered, so the measure is the
pipeline's own per-line cost: reading, parsing, dead letters, accounting)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.pipeline import run_job
from benchmarks.report import Figure


def measure(quick: bool) -> tuple[list[Figure], dict]:
    small = 5_000 if quick else 100_000
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lines in (small, 10 * small):
            path = Path(tmp) / f"{lines}.jsonl"
            path.write_text("".join(f'{{"body": {i}}}\n' for i in range(lines)))
            job = run_job([f"--input={path}", f"--output={tmp}/out{lines}", "--input_format=text"])
            counts = job["manifest"]["counts"]
            if counts["lines_dead_lettered"] != lines or counts["lines_unaccounted"]:
                raise RuntimeError(f"lines not accounted for: {counts}")
            raw[lines] = {"seconds": job["seconds"], "peak_rss_mib": job["peak_rss_mib"]}
    growth = raw[10 * small]["peak_rss_mib"] / raw[small]["peak_rss_mib"] - 1
    return [Figure("memory", f"{10 * small:,} vs {small:,} input lines",
                   f"peak RSS {raw[10 * small]['peak_rss_mib']:.0f} vs {raw[small]['peak_rss_mib']:.0f} MiB",
                   growth, "< 0.1", note="growth")], raw
