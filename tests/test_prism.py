"""The pipeline on Prism, Beam's portable runner in Go (a runner of its own: job service, bundles,
shuffles and an SDK worker over the Fn API): a batch job against the in-process FnApiRunner on the
same input, and a streaming job watching a directory for real, stopped and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_integrity import GRID, records, task, write_lines
from test_pipeline_default_run import GUARDED_MAIN, TESTS, run_guarded

from beam_extract.format.commits import read_groups_on_disk, select_groups
from beam_extract.readers.reader import read_activations, read_windows

PRISM = Path(sys.executable).parent / "prism"
pytestmark = pytest.mark.skipif(not PRISM.is_file() and not shutil.which("prism"),
                                reason="prism is not installed (make prism); `make test` installs it")

# Where and how the job ran: its bundles decide the commit groups and so the files.
RUNNER_FIELDS = {"created", "run_id", "commits", "commit_groups", "options", "dead_letter_files", "batching", "hooks"}


def job(tmp_path, name, *args, **env):
    result = run_guarded([f"--input={tmp_path / 'in'}/*.jsonl", f"--output={tmp_path / name}", "--layers=0,3",
                          "--sites=resid_post,attn_out", "--views_per_task=3", "--max_seq_len=512", *args],
                         tmp_path, tmp_path / f"{name}.log", **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / f"{name}.log").exists()  # nothing left the machine
    return json.loads((tmp_path / name / "manifest.json").read_text())


@pytest.mark.slow
def test_a_text_and_arc_job_on_prism_equals_the_in_process_runner(tmp_path):
    write_lines(tmp_path / "in/arc.jsonl", [task("t1"), task("t2", test=[{"input": GRID}, {"input": [[3]]}]),
                                            "{not json"])
    write_lines(tmp_path / "in/web.jsonl", [json.dumps({"id": f"d{i}", "text": "words and more words " * (9 * i + 1)})
                                            for i in range(12)])
    prism = job(tmp_path, "prism", "--runner=PrismRunner")
    local = job(tmp_path, "local", "--runner=DirectRunner")
    assert prism["ok"] and local["ok"]
    assert {k: v for k, v in prism.items() if k not in RUNNER_FIELDS} == {
        k: v for k, v in local.items() if k not in RUNNER_FIELDS}
    assert prism["hooks"].keys() == local["hooks"].keys()
    for name, hook in local["hooks"].items():
        theirs = prism["hooks"][name]
        assert [theirs[k] for k in ("site", "layer", "records", "tokens")] == [
            hook[k] for k in ("site", "layer", "records", "tokens")]
        for mean in ("mean_l2_norm", "mean_squared_norm"):  # sums over other groupings of the same tokens
            assert theirs[mean] == pytest.approx(hook[mean], rel=1e-9)
    ours, theirs = records(tmp_path / "prism"), records(tmp_path / "local")
    assert ours.keys() == theirs.keys() and len(ours) == 4 * prism["counts"]["samples"]
    for key, record in ours.items():
        assert record["token_ids"].tolist() == theirs[key]["token_ids"].tolist()
        # Not bit for bit: each runner's bundles make its own batches, and XLA:CPU's float32 matmuls
        # round differently for other batch shapes (about 1e-6; the other batch-composition tests'
        # tolerance). Where the batches agree, the bytes do.
        want = theirs[key]["activations"]
        np.testing.assert_allclose(record["activations"], want, rtol=0, atol=1e-5 * max(1, np.abs(want).max()),
                                   err_msg=str(key))


# Beam's default --job_server_timeout, 300 s, made 2 s in the job's processes: a job of ours on Prism
# outlasts it, as a real one outlasts 300 s (a 10^6-sample job failed so at its end, all written).
SHORT_BEAM_DEADLINE = """
from apache_beam.options.pipeline_options import PortableOptions
_add = PortableOptions._add_argparse_args.__func__
def _shorter(cls, parser):
    _add(cls, parser)
    parser.set_defaults(job_server_timeout=2)
PortableOptions._add_argparse_args = classmethod(_shorter)
"""


@pytest.mark.slow
def test_a_job_outlasting_beams_job_server_timeout_is_watched_to_its_end(tmp_path):
    """Beam watches a portable job through streams whose deadline is --job_server_timeout
    (apache/beam#35867): past it the command failed while Prism ran on. The job is now watched for
    its whole run unless the flag is given."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site/sitecustomize.py").write_text(SHORT_BEAM_DEADLINE)
    write_lines(tmp_path / "in/web.jsonl", [json.dumps({"text": f"document {i} " * 40}) for i in range(200)])
    began = time.monotonic()
    manifest = job(tmp_path, "out", "--runner=PrismRunner", "--layers=0",
                   PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(TESTS)]))
    assert time.monotonic() - began > 3 * 2  # the job ran well past the shortened deadline
    assert manifest["ok"] and manifest["counts"]["samples_committed"] == 200


def start_streaming(tmp_path, *args):
    """The streaming job on Prism, running in the background (stopped like a user does, with Ctrl-C)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", GUARDED_MAIN, str(tmp_path / "stream.log"), "--runner=PrismRunner",
                             "--streaming", f"--input={tmp_path / 'in'}/*.jsonl", f"--output={tmp_path / 'out'}",
                             f"--poll_interval={POLL}", f"--window_seconds={WINDOW}", f"--flush_seconds={FLUSH}",
                             "--layers=0", "--max_seq_len=256", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def drop(tmp_path, name: str, documents: int) -> tuple[set, float]:
    """Writes an input file atomically (as a copy into the watched directory would land) and
    returns its sample ids and when it landed."""
    lines = "".join(json.dumps({"text": f"{name} document {i} " * 12}) + "\n" for i in range(documents))
    (tmp_path / f".{name}").write_text(lines)
    os.rename(tmp_path / f".{name}", tmp_path / "in" / name)
    return {f"{name}:{line}#w0" for line in range(1, documents + 1)}, time.monotonic()


def committed(tmp_path) -> list[str]:
    kept = select_groups(read_groups_on_disk(str(tmp_path / "out"))).kept
    return [sample for group in kept for sample in group["samples"]]


def windows_with(tmp_path, samples: int) -> list[dict]:
    return [w for w in read_windows(str(tmp_path / "out")) if w["counts"]["samples_committed_now"] >= samples]


def wait_for(condition, job, timeout: float):
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def stop(job) -> str:
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr[-3000:]
    return stderr


POLL, FLUSH, WINDOW = 1, 1, 5


@pytest.mark.slow
def test_streaming_on_prism_picks_up_dropped_files_and_resumes_after_a_stop(tmp_path):
    (tmp_path / "in").mkdir()
    first, _ = drop(tmp_path, "a.jsonl", 3)
    job = start_streaming(tmp_path)
    try:
        # Start-up and the first compilations, then each new file within a window, its flush and a poll.
        wait_for(lambda: first <= set(committed(tmp_path)) and windows_with(tmp_path, 3), job, timeout=240)
        second, landed = drop(tmp_path, "b.jsonl", 2)
        wait_for(lambda: second <= set(committed(tmp_path)), job, timeout=120)
        wait_for(lambda: len(read_windows(str(tmp_path / "out"))) >= 2, job, timeout=120)
        latency = time.monotonic() - landed
        assert latency <= POLL + FLUSH + WINDOW + 20, latency  # slack for this 2-core machine's forwards
        stderr = stop(job)
    finally:
        job.kill()
    assert "the same command with --resume continues" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out/_run/lock.json").exists()
    assert not (tmp_path / "stream.log").exists()  # nothing left the machine

    job = start_streaming(tmp_path, "--resume")  # a and b are listed again: skipped, not written twice
    try:
        third, _ = drop(tmp_path, "c.jsonl", 4)
        wait_for(lambda: third <= set(committed(tmp_path)) and windows_with(tmp_path, 4), job, timeout=240)
        stop(job)
    finally:
        job.kill()
    ids = committed(tmp_path)
    assert sorted(ids) == sorted(first | second | third)  # each sample once
    indexes = read_windows(str(tmp_path / "out"))
    assert all(w["ok"] for w in indexes), [w["problems"] for w in indexes]
    assert sum(w["counts"]["samples_committed_now"] for w in indexes) == len(ids)
    assert all(hook["normalisation"]["saelens_scaling_factor"] > 0 for w in indexes
               if w["counts"]["samples_committed_now"] for hook in w["hooks"].values())
    assert sum(w["counts"]["samples_resumed"] for w in indexes) == len(first | second)
    # a and b were read by both jobs: the resumed one counts them as skipped (one sample per line).
    assert sum(w["counts"]["lines_skipped"] for w in indexes) == len(first | second)
    assert sum(w["counts"]["lines_read"] for w in indexes) == len(ids)
    for hook in ("blocks.0.hook_resid_post",):
        assert sorted(r["sample_id"] for r in read_activations(str(tmp_path / "out"), hook)) == sorted(ids)
