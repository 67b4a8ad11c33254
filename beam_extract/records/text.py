"""Web-text documents (FineWeb-style JSONL: {"text": ..., "id": ...?})."""

from __future__ import annotations

import dataclasses

from beam_extract.records.errors import InvalidRecord, check_id, check_unicode


@dataclasses.dataclass(frozen=True)
class TextDoc:
    key: str  # "{file name under the input root}:{line}": unique in a run, names the document's samples
    text: str
    source: str
    line_number: int
    doc_id: str = ""  # the document's own `id` field, kept as metadata ("" when absent)
    raw: str = ""  # the start of its input line, for dead letters of later stages


def validate_text(obj: dict, text_field: str, source: str, line_number: int, name: str | None = None) -> TextDoc:
    """`name`: the file's name relative to the input root (see records.identity); default `source`."""
    if text_field not in obj:
        raise InvalidRecord("missing_field", f"no {text_field!r} field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise InvalidRecord("wrong_type", f"{text_field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise InvalidRecord("empty_text", f"{text_field!r} is empty")
    check_unicode(text, text_field)
    doc_id = obj.get("id")
    doc_id = "" if doc_id is None else doc_id
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        raise InvalidRecord("wrong_type", f"'id' is a {type(doc_id).__name__}, not a string or an integer")
    doc_id = check_id(str(doc_id), "id")
    key = check_id(f"{name or source}:{line_number}", "file:line")
    return TextDoc(key, text, source, line_number, doc_id)
