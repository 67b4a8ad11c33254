"""Per-worker and driver cost independent of the run's size (issue 27): what can be checked in
process. The measured slopes are in `python -m benchmarks --only scale`."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to


def test_committed_ids_are_counted_per_id_and_summed_in_two_integers():
    from beam_extract.accounting.totals import TotalAndDistinct, count_committed

    with TestPipeline(runner="FnApiRunner") as pipeline:
        ids = pipeline | beam.Create(["a", "b", "a", "c", "c", "c"])
        assert_that(count_committed(ids, streaming=False), equal_to([{"total": 6, "distinct": 3}]))
    combine = TotalAndDistinct()
    acc = combine.create_accumulator()
    for times in [1] * 10_000 + [2]:
        acc = combine.add_input(acc, times)
    assert acc == (10_002, 10_001)  # the global step holds counts, never the ids


def test_route_makes_one_counter_per_name_not_one_per_element(monkeypatch):
    from beam_extract import stages
    from beam_extract.records.dead_letter import DeadLetter

    made = []
    real = stages.Metrics.counter
    monkeypatch.setattr(stages.Metrics, "counter", lambda *name: made.append(name) or real(*name))
    stages.counter.cache_clear()
    items = [object() if i % 10 else DeadLetter("f", i, "parse", "invalid_json", "x") for i in range(1000)]
    assert len(list(stages.route(items, "parse"))) == 1000
    assert sorted(made) == [("dead_letter.parse", "invalid_json"), ("parse", "out")]


def test_the_driver_reads_at_most_both_ends_of_a_local_input_file(tmp_path, monkeypatch):
    import builtins

    import beam_extract.io.inventory as inventory

    big = tmp_path / "a.jsonl"
    big.write_bytes(b'{"text": "one"}\n' * 100_000)  # 1.6 MB
    read = []

    class Counted:
        def __init__(self, handle):
            self._handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

        def seek(self, *args):
            return self._handle.seek(*args)

        def read(self, size):
            data = self._handle.read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(inventory, "open", lambda path, mode: Counted(builtins.open(path, mode)), raising=False)
    before = inventory.inventory(f"{tmp_path}/*.jsonl")
    assert before["files"]["a.jsonl"]["size"] == 1_600_000 and sum(read) == 2 * inventory.ENDS_BYTES
    # A copy of the same bytes (a new modification time) is the same input; another last line is not.
    os.utime(big, ns=(1, 10**18))
    assert inventory.changes(before, inventory.inventory(f"{tmp_path}/*.jsonl")) == []
    big.write_bytes(b'{"text": "one"}\n' * 99_999 + b'{"text": "two"}\n')  # same size, new content
    [change] = inventory.changes(before, inventory.inventory(f"{tmp_path}/*.jsonl"))
    assert change.startswith("a.jsonl changed (ends_crc32c ")
    recorded_by_checksum = {"root": before["root"], "files": {"a.jsonl": {"size": 1_600_000, "crc32c": "AAAAAA=="}}}
    assert inventory.changes(recorded_by_checksum, inventory.inventory(f"{tmp_path}/*.jsonl")) == []


def _worker_counts_while(process, driver_pid: int) -> dict[str, dict]:
    """What each worker process of a local job reported (its progress file, written by the worker
    every second), the last seen of each, polled until the job ends."""
    import glob
    import json
    import time

    seen: dict[str, dict] = {}
    while process.poll() is None:
        for path in glob.glob(f"/tmp/beam-extract-progress-{driver_pid}-*/*.json"):
            try:
                seen[os.path.basename(path)] = json.loads(open(path).read())
            except (OSError, ValueError):
                continue  # being replaced
        time.sleep(0.1)
    return seen


@pytest.mark.slow
def test_one_big_file_is_parsed_tokenized_and_extracted_by_both_worker_processes(tmp_path):
    """A single 100k-line uncompressed file, two worker processes: both parse, tokenize and run
    forwards (as each worker process reports), and the output equals the one-process run's."""
    import json
    import subprocess
    import sys

    import numpy as np

    from test_integrity import SMALL, records, write_lines
    from test_pipeline_default_run import GUARDED_MAIN, TESTS

    write_lines(tmp_path / "in" / "big.jsonl", [json.dumps({"text": f"doc {i} " + "word " * (i % 5)})
                                                for i in range(100_000)])
    args = [*SMALL, "--input=in/big.jsonl", "--layers=0", "--sites=resid_post", "--batch_size=64"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    def job(output, *more):
        process = subprocess.Popen([sys.executable, "-c", GUARDED_MAIN, str(tmp_path / "log"), *args,
                                    f"--output={output}", *more], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, text=True)
        counts = _worker_counts_while(process, process.pid)
        assert process.returncode == 0, process.stderr.read()[-3000:]
        return counts

    counts = job("two", "--direct_num_workers=2", "--direct_running_mode=multi_processing")
    workers = [c for c in counts.values() if c.get("lines")]
    assert len(workers) == 2, counts
    assert all(c["lines"] > 0 and c["samples"] > 0 and c.get("extracted", 0) > 0 for c in workers), counts
    job("one")
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert len(one) == 100_000 and two.keys() == one.keys()
    assert all(two[key]["source"] == one[key]["source"] for key in one)  # ids and line numbers as in one process
    assert all(np.allclose(two[key]["activations"], one[key]["activations"], rtol=1e-5, atol=1e-5) for key in one)
