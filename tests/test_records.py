"""Parsing never raises on bad input: every line becomes a record or a dead letter with a reason."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_extract.records.source_line import SourceLine
from beam_extract.records import DeadLetter, parse_line
from beam_extract.records.arc import ArcTask
from beam_extract.records.text import TextDoc

GRID = [[0, 1], [2, 3]]
TASK = {"task_id": "t1", "train": [{"input": GRID, "output": GRID}], "test": [{"input": GRID}]}


def line(data, number=7):
    return SourceLine("/data/in.jsonl", number, data if isinstance(data, bytes) else data.encode())


def reason(data, input_format="text"):
    result = parse_line(line(data), input_format)
    assert isinstance(result, DeadLetter), result
    assert result.source == "/data/in.jsonl" and result.line_number == 7 and result.stage == "parse"
    return result.reason


def test_text_document():
    doc = parse_line(line('{"text": "hello", "id": "d1"}'), "text", root="/data")
    assert doc == TextDoc("in.jsonl:7", "hello", "/data/in.jsonl", 7, doc_id="d1", raw='{"text": "hello", "id": "d1"}')
    assert parse_line(line('{"text": "hello", "id": 5}'), "text").doc_id == "5"
    assert parse_line(line('{"text": "hello", "id": null}'), "text").doc_id == ""
    assert parse_line(line('{"text": "hello"}'), "text").key == "/data/in.jsonl:7"  # no root: the whole path
    assert parse_line(line(b'\xef\xbb\xbf{"body": "x"}\r'.rstrip(b"\r")), "text", "body").text == "x"


@pytest.mark.parametrize("data, expected", [
    (b"\xff\xfe{}", "invalid_utf8"),
    ("{not json", "invalid_json"),
    ('{"text": NaN}', "invalid_json"),
    ('{"text": Infinity}', "invalid_json"),
    ("[" * 100000 + "]" * 100000, "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ('"text"', "not_an_object"),
    ("", "blank_line"),
    ("   ", "blank_line"),
    ('{"body": "x"}', "missing_field"),
    ('{"text": 5}', "wrong_type"),
    ('{"text": "  \\n "}', "empty_text"),
    ('{"text": "x", "id": ["a"]}', "wrong_type"),
    ('{"text": "x", "id": "\\udc00"}', "invalid_unicode"),
    ('{"text": "a\\ud800b"}', "invalid_unicode"),
])
def test_text_reasons(data, expected):
    assert reason(data) == expected


def test_arc_task():
    task = parse_line(line(json.dumps(TASK)), "arc")
    assert isinstance(task, ArcTask)
    assert task.task_id == "t1" and task.train == ((((0, 1), (2, 3)), ((0, 1), (2, 3))),)
    assert task.test == ((((0, 1), (2, 3)), None),)
    untitled = {k: v for k, v in TASK.items() if k != "task_id"}
    assert parse_line(line(json.dumps(untitled)), "arc").task_id == "/data/in.jsonl:7"
    assert parse_line(line(json.dumps(untitled)), "arc", root="/data").task_id == "in.jsonl:7"
    assert reason(json.dumps({**TASK, "task_id": "\udc00"}), "arc") == "invalid_unicode"
    assert isinstance(parse_line(line(json.dumps(TASK)), "auto"), ArcTask)
    assert isinstance(parse_line(line('{"text": "x"}'), "auto"), TextDoc)


def variant(**changes):
    return json.dumps({**TASK, **changes})


@pytest.mark.parametrize("data, expected", [
    (variant(train=[]), "empty_train"),
    (variant(test=[]), "empty_test"),
    (json.dumps({"task_id": "t", "test": TASK["test"]}), "missing_field"),
    (variant(train=[{"input": GRID}]), "missing_field"),
    (variant(train="grid"), "wrong_type"),
    (variant(task_id=5), "wrong_type"),
    (variant(test=[{"input": [[0, 1], [2]]}]), "ragged_grid"),
    (variant(test=[{"input": [[0, 10]]}]), "value_out_of_range"),
    (variant(test=[{"input": [[-1]]}]), "value_out_of_range"),
    (variant(test=[{"input": [[0.5]]}]), "wrong_type"),
    (variant(test=[{"input": [[True]]}]), "wrong_type"),
    (variant(test=[{"input": [[0] * 31]}]), "grid_too_large"),
    (variant(test=[{"input": [[0]] * 31}]), "grid_too_large"),
    (variant(test=[{"input": []}]), "wrong_type"),
    (variant(test=[{"input": [[0, 1]], "output": [[1, 2], [3]]}]), "ragged_grid"),
])
def test_arc_reasons(data, expected):
    assert reason(data, "arc") == expected


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), input_format=st.sampled_from(["arc", "text", "auto"]))
def test_arbitrary_bytes_give_a_record_or_a_reason(data, input_format):
    result = parse_line(line(data), input_format)
    assert isinstance(result, (DeadLetter, TextDoc, ArcTask))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["text", "id", "task_id", "train", "test", "input", "output"]), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON, input_format=st.sampled_from(["arc", "text", "auto"]))
def test_arbitrary_json_gives_a_record_or_a_reason(value, input_format):
    result = parse_line(line(json.dumps(value)), input_format)
    assert isinstance(result, (DeadLetter, TextDoc, ArcTask))
    if isinstance(result, DeadLetter):
        assert result.reason and result.raw


def test_the_readme_lists_every_dead_letter_reason_by_stage():
    import re
    from pathlib import Path

    from beam_extract.records.dead_letter import REASONS

    readme = Path(__file__).parent.parent.joinpath("README.md").read_text()
    paragraph = readme[re.search(r"Reasons by\s+stage:", readme).start():]
    paragraph = paragraph[: paragraph.index("\n\n")]
    listed = dict(re.findall(r"`(\w+)`\s+\(([^)]*)\)", paragraph))
    assert {stage: tuple(re.findall(r"`(\w+)`", codes)) for stage, codes in listed.items()} == REASONS


def test_ids_over_the_limit_are_dead_letters():
    """A 200 KB task id once made 240 MB of output from 16 tiny tests: an id is copied into every
    record. Ids up to MAX_ID_CHARS pass; longer ones are `id_too_long`, the id cut in the dead letter."""
    from beam_extract.records.errors import MAX_ID_CHARS

    at_limit = "é" * MAX_ID_CHARS
    assert parse_line(line(json.dumps({**TASK, "task_id": at_limit})), "arc").task_id == at_limit
    assert parse_line(line(json.dumps({"text": "x", "id": at_limit})), "text").doc_id == at_limit
    over = parse_line(line(json.dumps({**TASK, "task_id": "t" * 200_000})), "arc")
    assert over.reason == "id_too_long" and "200000 characters" in over.detail and len(over.record_id) <= 200
    assert reason(json.dumps({"text": "x", "id": "d" * (MAX_ID_CHARS + 1)})) == "id_too_long"
    assert reason(json.dumps({"text": "x", "id": 10 ** (MAX_ID_CHARS + 1)})) == "id_too_long"
    deep = SourceLine("/data/" + "d/" * MAX_ID_CHARS + "in.jsonl", 1, b'{"text": "x"}')
    assert parse_line(deep, "text", root="/data").reason == "id_too_long"  # its key, file:line, is the id
