"""Line or table row -> validated record (text document, token ids or ARC task) or a DeadLetter with a reason code."""

from __future__ import annotations

import dataclasses
import json

from beam_extract.records.source_line import SourceLine, SourceRow
from beam_extract.records.arc import ArcTask, validate_task
from beam_extract.records.dead_letter import MAX_RAW_BYTES, DeadLetter, raw_excerpt
from beam_extract.records.errors import InvalidRecord
from beam_extract.records.identity import relative_name
from beam_extract.records.text import TextDoc, validate_text
from beam_extract.records.tokens import TokenDoc, validate_tokens


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


# Of a row, the start of each string: the file and row number find it, and encoding the whole of
# every text as JSON would cost more than reading it.
_ROW_STRING_CHARS = 256
_ROW_ENCODER = json.JSONEncoder(ensure_ascii=False)
_quote = json.encoder.encode_basestring  # C, where the interpreter has it


def _cut(value):
    if isinstance(value, str):
        return value[:_ROW_STRING_CHARS]
    if isinstance(value, dict):
        return {key: _cut(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cut(item) for item in value[:_ROW_STRING_CHARS // 8]]
    if isinstance(value, bytes):
        return raw_excerpt(value[:_ROW_STRING_CHARS])
    return value if value is None or isinstance(value, (bool, int, float)) else str(value)


def row_excerpt(row: dict) -> str:
    """A table row as JSON, each string and list cut short, at most MAX_RAW_BYTES: what a dead
    letter keeps of it, as of a line its start. Strings, the common column, are quoted directly
    (this runs for every row)."""
    fields = (f"{_quote(str(key))}: " + (_quote(value[:_ROW_STRING_CHARS]) if isinstance(value, str)
                                         else _ROW_ENCODER.encode(_cut(value)))
              for key, value in row.items())
    return raw_excerpt(("{" + ", ".join(fields) + "}").encode("utf-8", "backslashreplace"))


def parse_line(line: SourceLine | SourceRow, input_format: str, text_field: str = "text", root: str = "",
               id_field: str = "id", tokens_field: str = "") -> TextDoc | TokenDoc | ArcTask | DeadLetter:
    """Never raises on bad input: the result is a record or a DeadLetter saying why not.

    line: a JSONL line, or a Parquet/Arrow row (its columns already decoded), validated alike.
    input_format: arc, text, tokens (a row of token ids), or auto (an object with a "train" field
    is an ARC task, anything else text).
    root: the input root (records.identity), which names files in ids.
    """
    is_row = isinstance(line, SourceRow)
    raw = row_excerpt(line.row) if is_row else raw_excerpt(line.data)
    if line.too_long:
        return DeadLetter(line.path, line.line_number, "parse", "line_too_long",
                          f"{line.too_long} bytes, over --max_line_bytes", raw)
    obj = None
    try:
        obj = line.row if is_row else decode_json_object(line.data)
        name = relative_name(line.path, root)
        if input_format == "arc" or (input_format == "auto" and "train" in obj):
            record = validate_task(obj, line.path, line.line_number, name)
        elif input_format == "tokens":
            record = validate_tokens(obj, tokens_field, line.path, line.line_number, name, id_field)
        else:
            record = validate_text(obj, text_field, line.path, line.line_number, name, id_field)
        return dataclasses.replace(record, raw=raw)
    except InvalidRecord as error:
        given = obj.get("task_id", obj.get(id_field, "")) if isinstance(obj, dict) else ""
        return DeadLetter(line.path, line.line_number, "parse", error.reason, str(error), raw,
                          record_id=str(given)[:200] if isinstance(given, (str, int)) else "")
