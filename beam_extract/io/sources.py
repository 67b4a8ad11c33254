"""Input lines with their origin: every line keeps (file, line number) for ids and dead letters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


class SourceLine(NamedTuple):
    path: str
    line_number: int  # 1-based
    data: bytes  # without the line ending; decoding is the parser's job (invalid UTF-8 is a dead letter)


def read_lines(path: str) -> Iterator[SourceLine]:
    """Streams one file (local or gs://, .gz by extension) line by line: memory does not grow with it."""
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as handle:
        for number, line in enumerate(iter(handle.readline, b""), start=1):
            yield SourceLine(path, number, line.rstrip(b"\r\n"))


# The predecessor's sharded dataset: DIR/master_metadata.json and DIR/shard_NNN/chunk_*.jsonl.
SHARDED_DATASET_MARKER = "master_metadata.json"
SHARDED_DATASET_FILES = "shard_*/chunk_*.jsonl"


def expand_input(pattern: str) -> str:
    """A glob as given, or the chunk files of an old-layout sharded dataset directory."""
    directory = pattern.rstrip("/")
    if FileSystems.exists(f"{directory}/{SHARDED_DATASET_MARKER}"):
        return f"{directory}/{SHARDED_DATASET_FILES}"
    return pattern


def match_paths(pattern: str) -> list[str]:
    """Sorted paths matching a glob; an error if none match."""
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not paths:
        raise FileNotFoundError(f"no file matches {pattern!r}")
    return paths


class MatchPaths(beam.PTransform):
    """Paths of the files matching a glob (local or gs://): matched once, or with `watch_seconds`
    listed again every so many seconds for new files (streaming). A watched file is emitted once,
    stamped with the time of the listing that found it: its arrival."""

    def __init__(self, pattern: str, watch_seconds: int = 0):
        super().__init__()
        self._pattern, self._watch_seconds = pattern, watch_seconds

    def expand(self, pbegin):
        match = (fileio.MatchContinuously(self._pattern, interval=self._watch_seconds, has_deduplication=True)
                 if self._watch_seconds else fileio.MatchFiles(self._pattern))
        return pbegin | "Match" >> match | "Paths" >> beam.Map(lambda metadata: metadata.path)


class ReadLines(beam.PTransform):
    """File paths -> SourceLine per line; each line keeps its file's timestamp and window."""

    def expand(self, paths):
        return (
            paths
            | "SpreadFiles" >> beam.Reshuffle()
            | "Lines" >> beam.FlatMap(read_lines)
        )
