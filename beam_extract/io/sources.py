"""Input lines with their origin: every line keeps (file, line number) for ids and dead letters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes


class SourceLine(NamedTuple):
    path: str
    line_number: int  # 1-based
    data: bytes  # without the line ending; decoding is the parser's job (invalid UTF-8 is a dead letter)


def read_lines(readable: fileio.ReadableFile) -> Iterator[SourceLine]:
    """Streams one (possibly .gz) file line by line, so memory does not grow with file size."""
    path = readable.metadata.path
    with readable.open(compression_type=CompressionTypes.AUTO) as handle:
        for number, line in enumerate(iter(handle.readline, b""), start=1):
            yield SourceLine(path, number, line.rstrip(b"\r\n"))


class ReadLines(beam.PTransform):
    """Files matching a glob (local or gs://) -> SourceLine per line. A glob matching nothing fails."""

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self._pattern)
            | "SpreadFiles" >> beam.Reshuffle()
            | "Open" >> fileio.ReadMatches()
            | "Lines" >> beam.FlatMap(read_lines)
        )
