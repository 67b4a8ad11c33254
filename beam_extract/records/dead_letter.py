"""A record of input that could not become activations, with the reason, kept for the user."""

from __future__ import annotations

import dataclasses
import json

# The tagged output every stage sends its dead letters to.
DEAD_LETTER = "dead_letter"
# Raw input kept in a dead letter is cut to this many bytes: enough to find and fix the line.
MAX_RAW_BYTES = 4096


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    source: str
    line_number: int
    stage: str  # parse | tokenize | extract
    reason: str  # a stable code, e.g. invalid_json, too_long
    detail: str
    raw: str = ""

    def to_json(self) -> str:
        """Always encodable as UTF-8: a lone surrogate from the input is written as an escape."""
        text = json.dumps(dataclasses.asdict(self), ensure_ascii=False)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_excerpt(data: bytes) -> str:
    return data[:MAX_RAW_BYTES].decode("utf-8", errors="backslashreplace")
