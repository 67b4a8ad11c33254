"""Progress of a local job, every few seconds, while it runs.

A local job's workers run in the driver's process or in processes it started, on its machine. Each
worker process adds its counts here (`count`), and a thread writes them every second to a file of
its own in a directory named after the driver. The driver (`Reporter`) sums the files and prints
one line: updating in place on a terminal, a plain line otherwise. On Dataflow the same counts are
Beam metrics (counters `parse/out`, `tokenize/out`, `extract/samples`, `extract/real_tokens`, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from beam_extract.lifetime import Driver

WRITE_SECONDS = 1.0
_lock = threading.Lock()
_counts: dict[Path, Counter] = {}  # per job (its progress directory): a process may run several jobs
_writer: threading.Thread | None = None


def progress_dir(driver: Driver) -> Path:
    """Where the workers of the driver's job leave their counts (the pid's start time tells apart a
    reused pid)."""
    return Path(tempfile.gettempdir()) / f"beam-extract-progress-{driver.pid}-{driver.start or 0}"


def count(driver: Driver | None, **amounts: float) -> None:
    """Adds to this process's counts for a local job (a remote job has no driver to report to)."""
    if driver is None:
        return
    global _writer
    with _lock:
        _counts.setdefault(progress_dir(driver), Counter()).update(amounts)
        if _writer is None:
            _writer = threading.Thread(target=_write_forever, daemon=True, name="beam-extract-progress")
            _writer.start()


def _write_forever() -> None:
    while True:
        time.sleep(WRITE_SECONDS)
        with _lock:
            pending = [(directory, json.dumps(dict(counts))) for directory, counts in _counts.items()]
        for directory, text in pending:
            if not directory.is_dir():  # that job has finished (or its driver is not reporting)
                continue
            path = directory / f"{os.getpid()}.json"
            try:
                staged = path.with_suffix(".tmp")
                staged.write_text(text)
                staged.replace(path)
            except OSError:
                pass  # the driver removed the directory meanwhile


def describe(counts: dict, seconds: float, extracting_seconds: float, input_bytes: int | None) -> str:
    """One line from the summed counts. `extracting_seconds`: since the first extracted batch."""
    parts = [f"{int(counts.get('lines', 0)):,} lines read"]
    if input_bytes:
        parts[0] += f" ({min(1.0, counts.get('bytes', 0) / input_bytes):.0%})"
    parts.append(f"{int(counts.get('samples', 0)):,} samples")
    extracted, tokens = int(counts.get("extracted", 0)), counts.get("tokens", 0)
    if extracted:
        rate = tokens / extracting_seconds if extracting_seconds > 0 else 0.0
        parts.append(f"{extracted:,} extracted ({rate:,.0f} tok/s)")
    if counts.get("compile_seconds"):
        parts.append(f"compiling {counts['compile_seconds']:.1f} s")
    busy = counts.get("device_seconds", 0.0)
    if extracted and extracting_seconds > 0:
        parts.append(f"device busy <= {min(1.0, busy / extracting_seconds):.0%}")
    samples, read_all = counts.get("samples", 0), input_bytes and counts.get("bytes", 0) >= input_bytes
    if read_all and extracted and extracting_seconds > 0 and samples > extracted:
        left = (samples - extracted) / (extracted / extracting_seconds)
        parts.append(f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left")
    return f"[{seconds:,.0f} s] " + " · ".join(parts)


class Reporter:
    """The driver's side: sums its workers' counts every `every` seconds and prints a line."""

    def __init__(self, driver: Driver, input_bytes: int | None, every: float = 5.0, stream: TextIO | None = None):
        self._directory = progress_dir(driver)
        self._input_bytes, self._every = input_bytes, every
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="beam-extract-reporter")
        self._terminal = self._stream.isatty()
        self._width = 0

    def __enter__(self) -> Reporter:
        with _lock:  # an earlier job of this process (same driver) counted here too
            _counts.pop(self._directory, None)
        shutil.rmtree(self._directory, ignore_errors=True)
        self._directory.mkdir(parents=True)
        self._started, self._extracting_since = time.monotonic(), None
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self._report()  # the last counts: a job shorter than `every` gets its line too
        if self._terminal and self._width:
            self._stream.write("\n")
        shutil.rmtree(self._directory, ignore_errors=True)

    def counts(self) -> dict:
        total: Counter = Counter()
        for path in self._directory.glob("*.json"):
            if path.stem == str(os.getpid()):
                continue  # this process's own counts are read below, without the writer's lag
            try:
                total.update(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced: its counts come with the next report
        with _lock:
            total.update(_counts.get(self._directory, Counter()))
        return dict(total)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._report()

    def _report(self) -> None:
        counts, now = self.counts(), time.monotonic()
        if counts.get("extracted") and self._extracting_since is None:
            self._extracting_since = now - min(self._every, now - self._started)  # it began within the last interval
        extracting = now - self._extracting_since if self._extracting_since is not None else 0.0
        line = describe(counts, now - self._started, extracting, self._input_bytes)
        if self._terminal:
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
