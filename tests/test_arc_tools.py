"""The ARC side tools: barc converter and prompt preview."""

import json

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
    assert "11 prompts: tokens min" in out and "dead letters: none" in out
