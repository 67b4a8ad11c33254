"""The ARC side tools: barc converter and prompt preview."""

import json
import re

import pyarrow as pa
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
    assert "x 4 hooks of d_model 64 in float32" in out


def test_preview_counts_dropped_train_examples_not_prompts(capsys, tmp_path):
    grid = [[1, 2, 3, 4, 5, 6, 7, 8]] * 8
    task = {"id": "big", "train": [{"input": grid, "output": grid}] * 6, "test": [{"input": grid}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(task) + "\n")
    preview.main(["--input", str(tmp_path / "t.jsonl"), "--num", "0", "--stats", "--views_per_task", "2",
                  "--max_seq_len", "600", "--layers", "1", "--sites", "resid_pre,mlp_out", "--output_dtype", "bfloat16"])
    out = capsys.readouterr().out
    found = re.search(r"2 samples: .*; (\d+) train examples dropped from 2 ARC prompts", out)
    assert found and int(found.group(1)) >= 4 and int(found.group(1)) % 2 == 0, out  # as many from each view
    assert "x 2 hooks of d_model 64 in bfloat16" in out
