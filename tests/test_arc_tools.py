"""The ARC side tools: barc converter and prompt preview."""

import json
import re

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from beam_extract import convert, preview
from beam_extract.records.parse import decode_json_object
from beam_extract.records.arc import validate_task

PAIR = [[[1, 0]], [[0, 1]]]


def test_convert_parquet_and_jsonl(tmp_path):
    rows = [[PAIR, PAIR, [[[2]], [[3]]]], [PAIR], [PAIR, [[[1, 2], [3]], [[1]]]], [PAIR, [[[4]], [[5]]]]]
    pq.write_table(pa.table({"examples": rows[:3], "source": ["a", "b", "c"]}), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.jsonl").write_text(json.dumps({"examples": rows[3]}) + "\n{broken\n")
    output = tmp_path / "arc.jsonl"
    assert convert.convert(str(tmp_path / "part-*"), output) == (2, 3)

    tasks = [validate_task(decode_json_object(line.encode()), "x", 1) for line in output.read_text().splitlines()]
    assert [len(t.train) for t in tasks] == [2, 1]
    assert tasks[0].test == ((((2,),), ((3,),)),)  # the last pair is the test, with its output
    assert tasks[0].task_id.startswith("part-0-0-") and tasks[1].task_id.startswith("part-1-0-")
    rejects = [json.loads(line) for line in (tmp_path / "arc.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects] == [(1, "empty_train"), (2, "ragged_grid"), (1, "invalid_json")]
    # Deterministic: converting again gives the same bytes.
    first = output.read_text()
    convert.convert(str(tmp_path / "part-*"), output)
    assert output.read_text() == first


def test_preview_prints_prompts_and_statistics(capsys):
    preview.main(["--num", "2", "--stats", "--view", "3"])
    out = capsys.readouterr().out
    assert out.count("=== ") == 2 and "sample-mirror/v3/t0" in out
    assert out.count("<|im_start|>assistant\n### Output\n\n```grid\n") == 2
    # --stats reads every view: 4 tasks with 5 tests at 8 views, and 6 documents.
    assert "46 samples: tokens min" in out and "dead letters: none" in out
    assert "x 4 hooks of width 64 in float32" in out


def test_preview_counts_dropped_train_examples_not_prompts(capsys, tmp_path):
    grid = [[1, 2, 3, 4, 5, 6, 7, 8]] * 8
    task = {"id": "big", "train": [{"input": grid, "output": grid}] * 6, "test": [{"input": grid}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(task) + "\n")
    preview.main(["--input", str(tmp_path / "t.jsonl"), "--num", "0", "--stats", "--views_per_task", "2",
                  "--max_seq_len", "600", "--layers", "1", "--sites", "resid_pre,mlp_out", "--output_dtype", "bfloat16"])
    out = capsys.readouterr().out
    found = re.search(r"2 samples: .*; (\d+) train examples dropped from 2 ARC prompts", out)
    assert found and int(found.group(1)) >= 4 and int(found.group(1)) % 2 == 0, out  # as many from each view
    assert "x 2 hooks of width 64 in bfloat16" in out


@pytest.mark.slow
def test_preview_predicts_a_jobs_bytes_and_dead_letters(tmp_path, capsys, monkeypatch):
    """Duplicate task ids, a line over --max_line_bytes, a relative --input (the job names sources by
    absolute path), bfloat16 and a position stride: preview's figures are the job's."""
    from test_pipeline_default_run import run_guarded

    from beam_extract.options import sample_input

    task = json.loads(open(sample_input().replace("sample_*", "sample_arc")).readline())
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.jsonl").write_text(json.dumps(task) + "\n" + json.dumps({"text": "word " * 400}) + "\n")
    (tmp_path / "in/b.jsonl").write_text(json.dumps(task) + "\n" + json.dumps({"text": "a short document"}) + "\n")
    args = ["--input=in/*.jsonl", "--views_per_task=2", "--max_line_bytes=1024", "--output_dtype=bfloat16",
            "--positions=::3", "--layers=0,2", "--sites=resid_post,mlp_out", "--max_seq_len=256"]
    monkeypatch.chdir(tmp_path)
    preview.main([*args, "--stats", "--num", "0"])
    out = capsys.readouterr().out
    result = run_guarded([*args, "--output=out"], tmp_path, tmp_path / "connections.log")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*/layer_*/*.tfrecord"))
    assert f"in all ({written:,} bytes)" in out
    assert f"{manifest['counts']['samples']} samples:" in out
    assert manifest["counts"]["dead_letters"] == {"duplicate_task_id": 1, "line_too_long": 1}
    assert "'duplicate_task_id': 1" in out and "'line_too_long': 1" in out
