"""Input: CPU per row of reading and parsing the same FineWeb-like documents as Parquet and as JSONL.

The job's own read and parse steps (io.tables.read_records, records.parse_line), in one process,
over one file of each format written from the same rows; interleaved, medians of the repeats.
Parquet must not cost more per row than JSONL.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beam_extract.io.tables import Columns, read_records
from beam_extract.records import parse_line
from beam_extract.records.text import TextDoc
from benchmarks.report import Figure

WORDS = np.array("the of and to in a is that for it as was with be by on not he this are or his from at which "
                 "river valley stone water flood sea hill sand wind rain".split())
ROW_GROUP_ROWS = 100_000  # pyarrow's write default is 1M rows; FineWeb's shards hold groups of about this many


def _rows(n: int, rng: np.random.Generator) -> pa.Table:
    """Documents of 20 to 400 words (FineWeb's are longer; short ones weigh the per-row cost)."""
    lengths = rng.integers(20, 400, n)
    words = rng.choice(WORDS, int(lengths.sum()))
    ends = np.cumsum(lengths)
    texts = [" ".join(words[end - size: end]) for end, size in zip(ends, lengths)]
    ids = [f"<urn:uuid:{i:08x}-0000-0000-0000-000000000000>" for i in range(n)]
    return pa.table({"text": texts, "id": ids, "dump": ["CC-MAIN-2024-10"] * n, "language_score": rng.random(n)})


def _write(directory: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    jsonl, parquet = directory / "docs.jsonl", directory / "docs.parquet"
    with open(jsonl, "w") as out, pq.ParquetWriter(parquet, _rows(1, rng).schema) as writer:
        for start in range(0, n, ROW_GROUP_ROWS):
            table = _rows(min(ROW_GROUP_ROWS, n - start), rng)
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            out.writelines(json.dumps(row) + "\n" for row in table.to_pylist())
    return jsonl, parquet


def _cpu_per_row(path: Path, n: int) -> float:
    columns = Columns(("text", "id"), "text")
    start, docs = time.process_time(), 0
    for item in read_records(str(path), columns):
        docs += isinstance(parse_line(item, "text", "text", str(path.parent)), TextDoc)
    seconds = time.process_time() - start
    assert docs == n, (path, docs)
    return seconds / n


def measure(quick: bool) -> tuple[list[Figure], dict]:
    rows, repeats = (100_000, 1) if quick else (1_000_000, 3)
    with tempfile.TemporaryDirectory() as directory:
        jsonl, parquet = _write(Path(directory), rows)
        sizes = {"jsonl_bytes": jsonl.stat().st_size, "parquet_bytes": parquet.stat().st_size}
        times = {"jsonl": [], "parquet": []}
        for _ in range(repeats):  # interleaved, so that the machine's load weighs on both alike
            for name, path in (("jsonl", jsonl), ("parquet", parquet)):
                times[name].append(_cpu_per_row(path, rows))
    per_row = {name: statistics.median(t) for name, t in times.items()}
    raw = {"rows": rows, "repeats": repeats, **sizes, **{f"{k}_cpu_us_per_row": v * 1e6 for k, v in per_row.items()},
           "all_cpu_us_per_row": {k: [x * 1e6 for x in v] for k, v in times.items()}}
    return [Figure("input", "Parquet vs JSONL: CPU per row read and parsed",
                   f"{per_row['parquet'] * 1e6:.1f} vs {per_row['jsonl'] * 1e6:.1f} us/row over {rows:,} FineWeb-like "
                   f"rows ({sizes['parquet_bytes'] / 2**20:.0f} MiB Parquet in row groups of {ROW_GROUP_ROWS:,}, "
                   f"{sizes['jsonl_bytes'] / 2**20:.0f} MiB JSONL; medians of {repeats}, interleaved)",
                   per_row["parquet"] / per_row["jsonl"], "<= 1")], raw
