"""Peak memory of the job on 100,000 vs 1,000,000 input lines (all dead-lettered, so the measure is
the pipeline's own per-line cost: reading, parsing, dead letters, accounting).

    python -m benchmarks.line_memory
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.pipeline import run_job


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {}
        for lines in (100_000, 1_000_000):
            path = Path(tmp) / f"{lines}.jsonl"
            path.write_text("".join(f'{{"body": {i}}}\n' for i in range(lines)))
            job = run_job([f"--input={path}", f"--output={tmp}/out{lines}", "--input_format=text"])
            counts = json.loads((Path(tmp) / f"out{lines}/manifest.json").read_text())["counts"]
            assert counts["lines_dead_lettered"] == lines and counts["lines_unaccounted"] == 0
            peaks[lines] = job["peak_rss_mib"]
            print(f"{lines:>9} lines: {job['seconds']:.1f} s, peak RSS {job['peak_rss_mib']:.0f} MiB")
    print(f"10x the lines: {100 * (peaks[1_000_000] / peaks[100_000] - 1):+.1f}% peak memory")


if __name__ == "__main__":
    main()
