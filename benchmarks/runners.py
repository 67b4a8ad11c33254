"""A real runner against the in-process one: the same batch job on Prism (Beam's portable runner
in Go: job service, bundles, an SDK worker over the Fn API) and on the FnApiRunner, interleaved,
wall time of the whole command, medians; Prism's own start-up (binary to job service accepting
connections) measured on its own. Flink would be measured the same way; its job server jar is not
served to these machines (see README, Run on Flink or Spark)."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import Figure

WORDS = "river valley stone water flood sea hill sand wind rain".split()


def _prism() -> str | None:
    beside = Path(sys.executable).parent / "prism"
    return str(beside) if beside.is_file() else shutil.which("prism")


def _startup_seconds(prism: str) -> float:
    """Start of the prism binary to its job service accepting a connection."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    server = subprocess.Popen([prism, "--job_port", str(port), "--serve_http=false"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                socket.create_connection(("localhost", port), timeout=0.1).close()
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.01)
    finally:
        server.kill()
        server.wait()


def _job_seconds(directory: Path, runner: str, run: int) -> float:
    output = directory / f"out-{runner}-{run}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "beam_extract", f"--runner={runner}", f"--input={directory}/in/*.jsonl",
                    f"--output={output}", "--layers=0,3", "--sites=resid_post,mlp_out"], check=True,
                   capture_output=True)
    seconds = time.perf_counter() - start
    if not json.loads((output / "manifest.json").read_text())["ok"]:
        raise RuntimeError(f"{runner}: the run is not ok")
    return seconds


def measure(quick: bool) -> tuple[list[Figure], dict]:
    prism = _prism()
    if prism is None:
        return [Figure("runners", "Prism vs the in-process runner", "prism is not installed (make prism)")], {}
    repeats, documents = (1, 60) if quick else (3, 240)
    times: dict[str, list[float]] = {"FnApiRunner": [], "PrismRunner": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "in").mkdir()
        with open(directory / "in/docs.jsonl", "w") as handle:
            for i in range(documents):
                handle.write(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20 + i % 200))})
                             + "\n")
        for run in range(repeats):  # interleaved, so a slow spell of the machine hits both
            for runner in times:
                times[runner].append(_job_seconds(directory, runner, run))
    startup = statistics.median(_startup_seconds(prism) for _ in range(repeats))
    local, portable = (statistics.median(times[r]) for r in ("FnApiRunner", "PrismRunner"))
    raw = {"documents": documents, "repeats": repeats, "seconds": times, "prism_startup_seconds": startup}
    return [
        Figure("runners", f"batch job on Prism vs the in-process FnApiRunner ({documents} documents, 2 hooks, "
                          "whole command)",
               f"{portable:.1f} s vs {local:.1f} s (medians of {repeats})", portable / local),
        Figure("runners", "Prism's start-up (binary to job service accepting jobs)", f"{startup:.2f} s", startup),
    ], raw
