"""One line of an input file, with where it came from (ids and dead letters name it)."""

from __future__ import annotations

from typing import NamedTuple


class SourceLine(NamedTuple):
    path: str
    line_number: int  # 1-based
    data: bytes  # without the line ending; decoding is the parser's job (invalid UTF-8 is a dead letter)
    too_long: int = 0  # a line over the byte limit: its length (data holds its start only), for a dead letter
