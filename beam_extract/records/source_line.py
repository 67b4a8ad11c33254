"""One line of an input file, with where it came from (ids and dead letters name it)."""

from __future__ import annotations

from typing import NamedTuple


class SourceLine(NamedTuple):
    path: str
    line_number: int  # 1-based
    data: bytes  # without the line ending; decoding is the parser's job (invalid UTF-8 is a dead letter)
    too_long: int = 0  # a line over the byte limit: its length (data holds its start only), for a dead letter


class SourceRow(NamedTuple):
    """One row of a Parquet or Arrow file: its columns the parser needs, as JSON-like values (a
    struct is a dict), numbered from 1 through the whole file like lines."""

    path: str
    line_number: int  # 1-based row of the file
    row: dict  # the columns read, by top-level name
    too_long: int = 0  # a text over the byte limit: its length (the row holds its start only)
    size: int = 0  # bytes of the values read, for progress
