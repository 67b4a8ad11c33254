"""A local job's progress: worker processes' counts summed by the driver and printed as it runs."""

from __future__ import annotations

import io
import multiprocessing
import os
import time

from beam_extract import progress
from beam_extract.lifetime import Driver, process_start


def driver() -> Driver:
    return Driver("this-host", os.getpid(), process_start(os.getpid()))


def _worker(job: Driver, lines: int) -> None:
    progress.count(job, lines=lines, bytes=lines * 10)
    time.sleep(2.5 * progress.WRITE_SECONDS)  # its counts are written while it runs


def test_the_driver_sums_its_worker_processes_and_prints_plain_lines():
    job, stream = driver(), io.StringIO()
    with progress.Reporter(job, input_bytes=1000, every=0.2, stream=stream) as reporter:
        workers = [multiprocessing.get_context("spawn").Process(target=_worker, args=(job, n)) for n in (30, 40)]
        progress.count(job, lines=5, bytes=50, samples=4)  # the driver's own process runs DoFns too
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert reporter.counts()["lines"] == 75 and reporter.counts()["bytes"] == 750
        time.sleep(0.5)
    lines = stream.getvalue().splitlines()
    assert lines and "\r" not in stream.getvalue()  # not a terminal: a plain line per report
    assert "75 lines read (75%) · 4 samples" in lines[-1]
    assert not progress.progress_dir(job).exists()  # removed when the job ends


def test_a_second_job_of_the_same_process_starts_from_zero():
    job = driver()
    for expected in (7, 3):
        with progress.Reporter(job, input_bytes=None, every=60, stream=io.StringIO()) as reporter:
            progress.count(job, lines=expected)
            time.sleep(2.5 * progress.WRITE_SECONDS)
            assert reporter.counts()["lines"] == expected


def test_the_line_says_rate_compiling_device_share_and_time_left():
    counts = {"lines": 1200, "bytes": 5000, "samples": 400, "extracted": 100, "tokens": 50000,
              "compile_seconds": 11.04, "device_seconds": 8.0}
    line = progress.describe(counts, 42.0, 10.0, input_bytes=5000)
    assert line == ("[42 s] 1,200 lines read (100%) · 400 samples · 100 extracted (5,000 tok/s) · compiling 11.0 s "
                    "· device busy <= 80% · about 30 s left")
    reading = progress.describe({**counts, "bytes": 2500}, 42.0, 10.0, input_bytes=5000)
    assert "(50%)" in reading and "left" not in reading  # samples are still being found
    assert progress.describe({"lines": 3}, 1.0, 0.0, None) == "[1 s] 3 lines read · 0 samples"


def test_a_job_shorter_than_the_interval_still_gets_its_line():
    """A local job that ends before the first report (the default job can take under 5 s) prints
    one line with its counts when it ends; this process's own counts are read without the writer's lag."""
    job, stream = driver(), io.StringIO()
    with progress.Reporter(job, input_bytes=100, every=60, stream=stream):
        progress.count(job, lines=10, bytes=100, samples=46)
    assert stream.getvalue().splitlines() == ["[0 s] 10 lines read (100%) · 46 samples"]
