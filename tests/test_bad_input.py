"""A corpus of every kind of bad line among good ones: the job completes, every bad line is a dead
letter with its reason, every good line is written, and lines read = with samples + dead-lettered + blank."""

import json
import re
from pathlib import Path

import numpy as np
import pytest


GRID = [[1, 0], [0, 2]]


def task(task_id, **changes):
    return json.dumps({"task_id": task_id, "train": [{"input": GRID, "output": GRID}], "test": [{"input": GRID}],
                       **changes})


BAD_LINES = [
    (b"\x00\xff\xfe garbage \x80\x81", "invalid_utf8"),
    (b"{\"text\": \"caf\xe9\"}", "invalid_utf8"),
    (b"{not json", "invalid_json"),
    (b'{"text": NaN}', "invalid_json"),
    (b'{"text": "x", "score": Infinity}', "invalid_json"),
    (b"[" * 50000 + b"]" * 50000, "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b"", "blank_lines"),  # counted by the reader: one dead letter for the file's blank lines
    ("\u3000".encode(), "blank_line"),  # blank once decoded (an ideographic space)
    (b'{"body": "no text field"}', "missing_field"),
    (b'{"text": 12345678901234567890123456789}', "wrong_type"),
    (b'{"text": "   "}', "empty_text"),
    (task("ragged", test=[{"input": [[1, 2], [3]]}]).encode(), "ragged_grid"),
    (task("range", test=[{"input": [[10]]}]).encode(), "value_out_of_range"),
    (task("large", test=[{"input": [[0] * 31]}]).encode(), "grid_too_large"),
    (task("no-train", train=[]).encode(), "empty_train"),
    (task("no-test", test=[]).encode(), "empty_test"),
    (task("twice").encode(), "duplicate_task_id"),  # the second "twice" below is the duplicate
    (task("huge", train=[{"input": [[1] * 30] * 30, "output": [[2] * 30] * 30}]).encode(), "too_long"),
]


def good_lines():
    rng = np.random.default_rng(3)
    lines = [json.dumps({"id": f"good{i}", "text": " ".join(rng.choice(["alpha", "beta", "gamma"], 5 + i))}).encode()
             for i in range(8)]
    lines.append(b'\xef\xbb\xbf{"id": "bom", "text": "a byte-order mark first"}')
    lines.append(b'{"id": "crlf", "text": "windows line ending"}\r')
    lines.append(json.dumps({"id": "ten-mb", "text": "word " * 2_000_000}).encode())  # a 10 MB line
    lines.append(task("twice").encode())
    lines.append(task("fine").encode())
    return lines


@pytest.mark.slow
def test_every_bad_line_is_a_dead_letter_and_every_good_line_is_written(tmp_path):
    from test_pipeline_default_run import run_guarded

    good = good_lines()
    with open(tmp_path / "corpus.jsonl", "wb") as handle:
        # The first "twice" task comes before the bad one in the file, so the later line is the duplicate.
        for line in good[-2:] + [b for b, _ in BAD_LINES] + good[:-2]:
            handle.write(line + b"\n")
    result = run_guarded([f"--input={tmp_path / 'corpus.jsonl'}", "--output=out", "--max_seq_len=1024",
                          "--views_per_task=1", "--layers=0"], tmp_path, tmp_path / "connections.log")
    assert result.returncode == 0, result.stderr[-5000:]
    assert "with samples + " in result.stdout and ": ok" in result.stdout

    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    counts = manifest["counts"]
    expected_reasons = {}
    for _, reason in BAD_LINES:
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert counts["dead_letters"] == expected_reasons
    assert counts["lines_read"] == len(BAD_LINES) + len(good)
    assert counts["lines_dead_lettered"] == len(BAD_LINES) - 1 and counts["lines_with_samples"] == len(good)
    assert counts["lines_blank"] == 1
    assert counts["lines_unaccounted"] == 0

    letters = [json.loads(line) for path in (tmp_path / "out/dead_letter").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert sorted(d["reason"] for d in letters) == sorted(r for _, r in BAD_LINES)
    for letter in letters:
        assert letter["source"].endswith("corpus.jsonl") and letter["line_number"] >= 1
        assert letter["stage"] in ("parse", "dedup", "tokenize") or letter["reason"] == "blank_lines"
        assert letter["detail"]
        assert len(letter["raw"].encode()) <= 4 * 4096  # cut to a bounded size (escapes may widen it)
    duplicate = next(d for d in letters if d["reason"] == "duplicate_task_id")
    assert duplicate["line_number"] == 2 + [r for _, r in BAD_LINES].index("duplicate_task_id") + 1

    from beam_extract.readers.reader import read_records

    written = {r["sample_id"]: r["doc_id"] for r in read_records(str(tmp_path / "out/resid_post/layer_00/*.tfrecord"))}
    assert {"twice/v0/t0", "fine/v0/t0"} <= written.keys()
    by_doc = {}
    for sample_id, doc_id in written.items():
        by_doc.setdefault(doc_id, set()).add(sample_id)
    assert {f"good{i}" for i in range(8)} | {"bom", "crlf"} <= by_doc.keys()
    line = 2 + len(BAD_LINES) + next(i for i, g in enumerate(good[:-2]) if b'"ten-mb"' in g) + 1
    assert by_doc["ten-mb"] == {f"corpus.jsonl:{line}#w{i}" for i in range(2_000_000 // 1024 + 1)}


FORBIDDEN = re.compile(r"\bimport pickle\b|\bpickle\.|torch\.load|\beval\(|\bexec\(|trust_remote_code\s*=\s*True")


def test_the_package_never_unpickles_evaluates_or_trusts_remote_code():
    package = Path(__file__).parent.parent / "beam_extract"
    offenders = [f"{path.relative_to(package)}:{n}: {line.strip()}"
                 for path in sorted(package.rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), start=1) if FORBIDDEN.search(line)]
    assert not offenders, offenders
    # The scan itself works: it would have caught these.
    assert all(FORBIDDEN.search(s) for s in ("import pickle", "torch.load(f)", "eval(x)", "trust_remote_code=True"))
