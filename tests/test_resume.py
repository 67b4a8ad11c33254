"""Nothing lost, nothing twice: a run killed mid-way and resumed equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from beam_extract.readers.reader import read_records
from test_pipeline_default_run import GUARDED_MAIN, TESTS

WORDS = "river valley stone water flood sea hill sand wind rain".split()
ARGS = ["--input_format=text", "--packing=off", "--buckets=multiples:32", "--max_seq_len=384", "--batch_size=2",
        "--layers=0,3", "--sites=resid_post,attn_out", "--shard_size_mb=1"]


def make_inputs(directory, files=4, docs=30):
    rng = np.random.default_rng(1)
    for f in range(files):
        with open(directory / f"shard-{f}.jsonl", "w") as handle:
            for d in range(docs):
                handle.write(json.dumps({"id": f"f{f}d{d}", "text": " ".join(rng.choice(WORDS, rng.integers(5, 350)))})
                             + "\n")
    return str(directory / "shard-*.jsonl")


def start(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", GUARDED_MAIN, str(cwd / "connections.log"), *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def contents(output):
    """(hook, sample id) -> activation bytes, for every record under output."""
    found = {}
    for path in sorted(output.glob("*/layer_*/*.tfrecord")):
        for record in read_records(str(path)):
            key = (record["hook_name"], record["sample_id"])
            assert key not in found, f"{key} written twice"
            found[key] = record["activations"].tobytes()
    return found


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_output(tmp_path):
    pattern = make_inputs(tmp_path)
    reference = start([f"--input={pattern}", "--output=reference", *ARGS], tmp_path)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    victim = start([f"--input={pattern}", "--output=resumed", *ARGS], tmp_path)
    commits = tmp_path / "resumed/_committed"
    deadline = time.monotonic() + 300
    while not (commits.exists() and len(list(commits.glob("*.json"))) >= 2):
        assert victim.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = len(list(commits.glob("*.json")))
    assert not (tmp_path / "resumed/manifest.json").exists()

    refused = start([f"--input={pattern}", "--output=resumed", *ARGS], tmp_path)
    assert refused.wait(timeout=300) != 0 and "--resume" in refused.stderr.read()

    resumed = start([f"--input={pattern}", "--output=resumed", "--resume", *ARGS], tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    manifest = json.loads((tmp_path / "resumed/manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["samples_resumed"] > 0 and counts["samples_extracted_now"] > 0
    assert counts["samples_committed_twice"] == 0 and counts["lines_unaccounted"] == 0
    assert counts["lines_read"] == 120 and counts["samples"] == counts["samples_committed"] == 120
    assert manifest["commits"] > done_before

    expected, got = contents(tmp_path / "reference"), contents(tmp_path / "resumed")
    assert set(got) == set(expected) and len(got) == 4 * 120
    assert got == expected  # same activation bytes, though batched differently
    assert not list((tmp_path / "resumed").rglob(".*.tmp"))  # the killed run's temporaries are gone
    assert not (tmp_path / "connections.log").exists()


@pytest.mark.slow
def test_shuffled_output_holds_the_same_records_in_another_order(tmp_path):
    from beam_extract.format.schema import decode_record
    from beam_extract.format.tfrecord import iter_tfrecord
    from beam_extract.readers.reader import hook_files

    pattern = make_inputs(tmp_path, files=3, docs=20)
    common = [f"--input={pattern}", "--input_format=text", "--max_seq_len=256", "--layers=1", "--batch_size=2"]
    runs = {"plain": [], "shuffled": ["--shuffle", "--seed=5"], "again": ["--shuffle", "--seed=5"],
            "other": ["--shuffle", "--seed=6"]}
    for name, extra in runs.items():
        process = start(common + [f"--output={name}"] + extra, tmp_path)
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]

    def order(name):
        files = hook_files(str(tmp_path / name), "blocks.1.hook_resid_post")
        return [[decode_record(data)["sample_id"] for data in iter_tfrecord(f)] for f in files]

    plain, shuffled = order("plain"), order("shuffled")
    assert sorted(s for f in plain for s in f) == sorted(s for f in shuffled for s in f)
    ids = [s for f in plain for s in f]
    assert len(set(ids)) == len(ids) >= 60  # every window of every document, once
    assert plain != shuffled and order("again") == shuffled and order("other") != shuffled
    # Consecutive records in a shuffled file seldom come from the same input file.
    neighbours = [(a.split(":")[0], b.split(":")[0]) for f in shuffled for a, b in zip(f, f[1:])]
    assert sum(a == b for a, b in neighbours) < 0.75 * len(neighbours)
