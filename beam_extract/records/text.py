"""Web-text documents (FineWeb-style JSONL: {"text": ..., "id": ...?})."""

from __future__ import annotations

import dataclasses

from beam_extract.records.errors import InvalidRecord


@dataclasses.dataclass(frozen=True)
class TextDoc:
    doc_id: str
    text: str
    source: str
    line_number: int


def validate_text(obj: dict, text_field: str, source: str, line_number: int) -> TextDoc:
    if text_field not in obj:
        raise InvalidRecord("missing_field", f"no {text_field!r} field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise InvalidRecord("wrong_type", f"{text_field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise InvalidRecord("empty_text", f"{text_field!r} is empty")
    doc_id = obj.get("id")
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or doc_id == "":
        doc_id = f"{source}:{line_number}"  # deterministic for the same input file
    return TextDoc(str(doc_id), text, source, line_number)
