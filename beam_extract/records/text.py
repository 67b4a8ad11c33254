"""Web-text documents (FineWeb-style JSONL or Parquet rows: {"text": ..., "id": ...?})."""

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


_MISSING = object()


def field(obj: dict, name: str):
    """`obj[name]`, or with a dotted name the field nested under its parts (`meta.text`): a key
    that holds the dot itself wins. A missing field, or a parent that is no object, is missing."""
    if name in obj:
        return obj[name]
    value = obj
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise InvalidRecord("missing_field", f"no {name!r} field")
        value = value[part]
    return value


def document_id(obj: dict, id_field: str) -> str:
    """The document's own id (`id_field`, "" when absent or null), a string or an integer."""
    try:
        doc_id = field(obj, id_field)
    except InvalidRecord:
        return ""
    doc_id = "" if doc_id is None else doc_id
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        raise InvalidRecord("wrong_type", f"{id_field!r} is a {type(doc_id).__name__}, not a string or an integer")
    return check_unicode(str(doc_id), id_field)


def validate_text(obj: dict, text_field: str, source: str, line_number: int, name: str | None = None,
                  id_field: str = "id") -> TextDoc:
    """`name`: the file's name relative to the input root (see records.identity); default `source`."""
    text = field(obj, text_field)
    if not isinstance(text, str):
        raise InvalidRecord("wrong_type", f"{text_field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise InvalidRecord("empty_text", f"{text_field!r} is empty")
    check_unicode(text, text_field)
    key = check_id(f"{name or source}:{line_number}", "file:line")
    return TextDoc(key, text, source, line_number, check_id(document_id(obj, id_field), id_field))
