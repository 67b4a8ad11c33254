"""The pipeline on Prism, Beam's portable runner in Go (a runner of its own: job service, bundles,
shuffles and an SDK worker over the Fn API), against the in-process FnApiRunner on the same input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_integrity import GRID, records, task, write_lines
from test_pipeline_default_run import run_guarded

PRISM = Path(sys.executable).parent / "prism"
pytestmark = pytest.mark.skipif(not PRISM.is_file() and not shutil.which("prism"),
                                reason="prism is not installed (make prism); `make test` installs it")

# Where and how the job ran: its bundles decide the commit groups and so the files.
RUNNER_FIELDS = {"created", "run_id", "commits", "commit_groups", "options", "dead_letter_files", "batching", "hooks"}


def job(tmp_path, name, *args):
    result = run_guarded([f"--input={tmp_path / 'in'}/*.jsonl", f"--output={tmp_path / name}", "--layers=0,3",
                          "--sites=resid_post,attn_out", "--views_per_task=3", "--max_seq_len=512", *args],
                         tmp_path, tmp_path / f"{name}.log")
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
