"""Injected failures on real runners (beam_extract.faults), at each point where a failure could lose
or duplicate work: before a forward, after a shard group's files and commit are written but before
its bundle completes, and in the finalization. Beam's BundleBasedDirectRunner retries the failed
bundle within the job; Prism fails the job, and `--resume` completes it. Either way every sample is
written exactly once, as a run without failures writes it, and no file of a failed attempt is left."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_integrity import files_on_disk, records, task, write_lines
from test_pipeline_default_run import run_guarded

from beam_extract.faults import FAULT_ENV, POINTS
from beam_extract.format.commits import read_groups_on_disk, select_groups

PRISM = Path(sys.executable).parent / "prism"
ARGS = ["--layers=0,2", "--sites=resid_post,mlp_out", "--views_per_task=2", "--max_seq_len=256", "--batch_size=2"]


def job(workdir: Path, name: str, *args: str, faults: dict | None = None):
    env = {FAULT_ENV: ",".join(f"{point}:{marker}" for point, marker in faults.items())} if faults else {}
    result = run_guarded([f"--input={workdir / 'in'}/*.jsonl", f"--output={workdir / name}", *ARGS, *args], workdir,
                         workdir / f"{name}.log", **env)
    assert not (workdir / f"{name}.log").exists()  # nothing left the machine
    return result


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The input, and its output from a run without failures."""
    workdir = tmp_path_factory.mktemp("retries")
    write_lines(workdir / "in/arc.jsonl", [task("t1"), task("t2")])
    write_lines(workdir / "in/web.jsonl", [json.dumps({"text": "some words " * (15 * i + 2)}) for i in range(9)])
    result = job(workdir, "clean", "--runner=DirectRunner")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def assert_same_as_clean(workdir: Path, name: str) -> None:
    """Every sample once, the clean run's records, and on disk nothing but what the manifest lists."""
    output, reference = workdir / name, workdir / "clean"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["ok"], manifest["problems"]
    expected = json.loads((reference / "manifest.json").read_text())["counts"]
    assert manifest["counts"]["samples_committed"] == expected["samples_committed"] == expected["samples"]
    assert manifest["counts"]["samples_committed_twice"] == 0
    ours, theirs = records(output), records(reference)  # fails on a record read twice
    assert ours.keys() == theirs.keys()
    for key, record in ours.items():
        assert record["sequence_token_ids"].tolist() == theirs[key]["sequence_token_ids"].tolist()
        want = theirs[key]["activations"]  # other bundles, other batches: float32 rounding apart
        np.testing.assert_allclose(record["activations"], want, rtol=0, atol=1e-5 * max(1, np.abs(want).max()))
    listed = {f for hook in manifest["hooks"].values() for f in hook["files"]}
    assert {f for f in files_on_disk(output) if f.endswith(".tfrecord")} == listed
    assert {f for f in files_on_disk(output) if f.startswith("_committed/")} == {
        f"_committed/{group}.json" for group in manifest["commit_groups"]}
    temporaries = [f for f in files_on_disk(output) if ("/." in f or f.startswith(".")) and f != "_run/.guard"]
    assert not temporaries  # (the lock's guard file stays, as after every local run)


@pytest.mark.slow
def test_a_runner_that_retries_bundles_writes_each_sample_once(clean):
    markers = {point: clean / f"retried-{point}" for point in POINTS}
    result = job(clean, "retried", "--runner=BundleBasedDirectRunner", faults=markers)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(marker.exists() for marker in markers.values())  # every fault fired, and was retried
    assert all(f"injected fault at {point}" in result.stderr for point in POINTS)
    assert_same_as_clean(clean, "retried")


@pytest.mark.slow
@pytest.mark.skipif(not PRISM.is_file() and not shutil.which("prism"), reason="prism is not installed (make prism)")
def test_a_runner_that_fails_the_job_is_completed_by_resume(clean):
    """Prism fails the job at each fault in turn; after each, readers see every committed sample once
    and whole; the last --resume completes the output."""
    for attempt, point in enumerate(POINTS):
        result = job(clean, "prism", "--runner=PrismRunner", *(["--resume"] if attempt else []),
                     faults={point: clean / f"prism-{point}"})
        assert result.returncode not in (0, 2), result.stderr[-3000:]
        assert f"injected fault at {point}" in result.stderr
        assert not (clean / "prism/manifest.json").exists() and not (clean / "prism/_run/lock.json").exists()
        kept = select_groups(read_groups_on_disk(str(clean / "prism"))).kept
        ids = [sample for group in kept for sample in group["samples"]]
        assert len(ids) == len(set(ids))
    assert kept, "the faults after the writes and in the finalization come after commits"
    result = job(clean, "prism", "--runner=PrismRunner", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_clean(clean, "prism")
