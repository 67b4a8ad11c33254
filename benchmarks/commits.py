"""Output layout at many batches: files per hook, commit records and the time a --resume takes to
start extracting, for the same samples cut into many small forward batches or fewer large ones.
Both must follow the bytes written, not the number of batches."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from beam_extract.job import claim_output, make_job
from beam_extract.pipeline import run
from beam_extract.sink.ownership import release_lock
from benchmarks.report import Figure

WORDS = "river valley stone water flood sea hill sand wind rain".split()


def _job(directory: Path, output: str, rows: int, *extra: str) -> list[str]:
    return [f"--input={directory}/docs.jsonl", f"--output={directory}/{output}", "--input_format=text",
            "--packing=off", "--buckets=32", "--max_seq_len=32", f"--batch_size={rows}", "--layers=0",
            "--shard_size_mb=1", *extra]


def _layout(output: Path) -> dict:
    manifest = json.loads((output / "manifest.json").read_text())
    hook = next(iter(manifest["hooks"].values()))
    return {"batches": manifest["batching"]["batches"], "files_per_hook": len(hook["files"]),
            "commit_records": len(list((output / "_committed").glob("*.json"))),
            "bytes_per_hook": sum((output / f).stat().st_size for f in hook["files"]), "ok": manifest["ok"]}


def _resume_start(directory: Path, output: str, rows: int) -> float:
    """Seconds from the driver's start of a --resume to the graph being ready: lock, fingerprint
    check, reading the groups and writing the skip list (the model's checksum aside)."""
    job = make_job(PipelineOptions(_job(directory, output, rows, "--resume")))
    start = time.perf_counter()
    claimed = claim_output(job)
    seconds = time.perf_counter() - start
    release_lock(claimed.output, claimed.lock)
    return seconds


def measure(quick: bool) -> tuple[list[Figure], dict]:
    documents = 1000 if quick else 5000
    rng = np.random.default_rng(0)
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        with open(directory / "docs.jsonl", "w") as handle:
            for _ in range(documents):  # about 25 tokens each: one row of 32 per document
                handle.write(json.dumps({"text": " ".join(rng.choice(WORDS, 24))}) + "\n")
        for name, rows in (("many", 1), ("few", 8)):
            start = time.perf_counter()
            run(_job(directory, name, rows))
            raw[name] = {**_layout(directory / name), "rows_per_batch": rows,
                         "run_seconds": time.perf_counter() - start,
                         "resume_start_seconds": _resume_start(directory, name, rows)}
    many, few = raw["many"], raw["few"]
    shard_mib = 1
    expected = int(np.ceil(many["bytes_per_hook"] / 2**20 / shard_mib))
    return [
        Figure("commits", f"files per hook, {many['batches']} batches of 1 row vs {few['batches']} of 8",
               f"{many['files_per_hook']} vs {few['files_per_hook']} files for "
               f"{many['bytes_per_hook'] / 2**20:.1f} MiB "
               f"per hook at --shard_size_mb {shard_mib} (bytes / shard size: {expected}; one file per batch would "
               f"be {many['batches']})", many["files_per_hook"] / few["files_per_hook"], "<= 1.5"),
        Figure("commits", "commit records, many vs few batches",
               f"{many['commit_records']} vs {few['commit_records']} (one file per batch and hook before: "
               f"{many['batches']} per hook)", many["commit_records"] / few["commit_records"], "<= 1.5"),
        Figure("commits", "--resume: time to start extracting, many vs few batches",
               f"{many['resume_start_seconds']:.2f} s vs {few['resume_start_seconds']:.2f} s (lock, fingerprint, "
               "groups read, skip list written)", many["resume_start_seconds"] / few["resume_start_seconds"],
               "<= 1.5"),
    ], raw
