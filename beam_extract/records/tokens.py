"""Pre-tokenized documents: a row of token ids (SAELens-style `input_ids` or `tokens`), taken as they are."""

from __future__ import annotations

import dataclasses

from beam_extract.records.errors import InvalidRecord, check_id
from beam_extract.records.text import document_id, field

# Without --tokens_field, the first of these a row has.
TOKENS_FIELDS = ("input_ids", "tokens")


@dataclasses.dataclass(frozen=True)
class TokenDoc:
    key: str  # "{file name under the input root}:{row}", as a text document's
    token_ids: tuple[int, ...]
    source: str
    line_number: int
    doc_id: str = ""
    raw: str = ""


def validate_tokens(obj: dict, tokens_field: str, source: str, line_number: int, name: str | None = None,
                    id_field: str = "id") -> TokenDoc:
    """A list of integer ids (not bools); whether each has a row in the model's embedding is
    checked when the model is known (tokenize stage, token_out_of_range)."""
    names = (tokens_field,) if tokens_field else TOKENS_FIELDS
    found = next((n for n in names if n in obj), None) or next((n for n in names if "." in n), None)
    if found is None:
        raise InvalidRecord("missing_field", f"no {' or '.join(repr(n) for n in names)} field")
    ids = field(obj, found)
    if not isinstance(ids, (list, tuple)):
        raise InvalidRecord("wrong_type", f"{found!r} is a {type(ids).__name__}, not a list of token ids")
    if not ids:
        raise InvalidRecord("empty_text", f"{found!r} is empty")
    odd = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)][:1]
    if odd:
        raise InvalidRecord("wrong_type", f"{found!r} holds a {type(odd[0]).__name__}, not only integer token ids")
    key = check_id(f"{name or source}:{line_number}", "file:line")
    return TokenDoc(key, tuple(ids), source, line_number, check_id(document_id(obj, id_field), id_field))
