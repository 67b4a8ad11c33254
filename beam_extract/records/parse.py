"""Line -> validated record (text document or ARC task) or a DeadLetter with a reason code."""

from __future__ import annotations

import dataclasses
import json

from beam_extract.records.source_line import SourceLine
from beam_extract.records.arc import ArcTask, validate_task
from beam_extract.records.dead_letter import DeadLetter, raw_excerpt
from beam_extract.records.errors import InvalidRecord
from beam_extract.records.identity import relative_name
from beam_extract.records.text import TextDoc, validate_text


def _reject_constant(name: str) -> float:
    # json accepts NaN and Infinity by default; they are not JSON and never valid in our inputs.
    raise ValueError(f"{name} is not valid JSON")


def decode_json_object(data: bytes) -> dict:
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is tolerated
    except UnicodeDecodeError as error:
        raise InvalidRecord("invalid_utf8", str(error)) from None
    if not text.strip():
        raise InvalidRecord("blank_line", "line is empty")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise InvalidRecord("invalid_json", str(error)[:200]) from None
    if not isinstance(value, dict):
        raise InvalidRecord("not_an_object", f"top-level JSON value is a {type(value).__name__}")
    return value


def parse_line(line: SourceLine, input_format: str, text_field: str = "text",
               root: str = "") -> TextDoc | ArcTask | DeadLetter:
    """Never raises on bad input: the result is a record or a DeadLetter saying why not.

    input_format: arc, text, or auto (an object with a "train" field is an ARC task).
    root: the input root (records.identity), which names files in ids.
    """
    if line.too_long:
        return DeadLetter(line.path, line.line_number, "parse", "line_too_long",
                          f"{line.too_long} bytes, over --max_line_bytes", raw_excerpt(line.data))
    obj = None
    try:
        obj = decode_json_object(line.data)
        name = relative_name(line.path, root)
        if input_format == "arc" or (input_format == "auto" and "train" in obj):
            record = validate_task(obj, line.path, line.line_number, name)
        else:
            record = validate_text(obj, text_field, line.path, line.line_number, name)
        return dataclasses.replace(record, raw=raw_excerpt(line.data))
    except InvalidRecord as error:
        given = obj.get("task_id", obj.get("id", "")) if isinstance(obj, dict) else ""
        return DeadLetter(line.path, line.line_number, "parse", error.reason, str(error), raw_excerpt(line.data),
                          record_id=str(given)[:200] if isinstance(given, (str, int)) else "")
