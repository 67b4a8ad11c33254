"""Input lines with their origin: every line keeps (file, line number) for ids and dead letters.

A file that cannot be read whole is never a crash and never a silent loss: `read_lines` yields the
lines it could read and then exactly one DeadLetter (stage "read") whose `line_number` is how many
lines were yielded before the failure. Reason codes (stable):

- truncated_file: the compressed stream ends before its end marker (a cut gzip, bz2, xz, zstd or
  deflate file; an empty file, which no compressor writes). Only lines that end with their newline inside the part that still decoded are
  yielded: the bytes after the last newline are a line of unknown length, possibly cut, so they are
  dropped (in a complete file a last line without newline is kept, as before).
- corrupt_file: the compressed data is bad (not gzip at all, CRC mismatch, zlib/bz2/lzma/zstd error).
  A gzip CRC covers a whole member and is checked at its end, so lines decoded before the damage was
  detected have been yielded already (holding them back would need the member in memory); if they
  are garbage, parsing dead-letters them.
- not_a_file: a directory, FIFO, socket or device (local paths); never opened, so a FIFO cannot hang
  the job. Every gs:// path listed is an object.
- bad_file_name: the local name is not valid UTF-8 (a str with surrogate escapes); it would break
  every JSON or protobuf record that names its source, so the file is not read.
- unreadable_file: the storage failed while opening or reading (permission denied, vanished, I/O
  error, a GCS error).
- expansion_too_large: a compressed file decodes to more than `max_expansion` times the compressed
  bytes read so far (past its first EXPANSION_FREE_BYTES): a small file must not cost unbounded time,
  memory or dead letters. The lines decoded before are yielded.

Blank lines (nothing but ASCII whitespace) are not lines of input: they are skipped, counted, and a
file that has any ends with one `blank_lines` DeadLetter (stage "read") whose `line_number` is how
many there were (before any failure's dead letter), so that a million of them cost one record, and
every line is still accounted for.

A dead letter's `source` is the path with invalid UTF-8 bytes shown as backslash escapes; its
`detail` names the file and says how many lines were read.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import typing
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import apache_beam as beam
import zstandard
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter
from beam_extract.records.source_line import SourceLine


# Default --max_expansion: decoded bytes per compressed byte. Text and ARC JSONL compress 3-15x;
# gzip's own limit is about 1000x, xz's and zstd's beyond 10000x.
MAX_EXPANSION = 200
EXPANSION_FREE_BYTES = 1 << 16  # decoded before the ratio applies: a small file's headers and all
# Default --max_line_bytes: a line longer than this is a `line_too_long` dead letter, read past
# without being held in memory.
MAX_LINE_BYTES = 64 << 20
_KEPT_OF_A_LONG_LINE = 4096  # the start of an over-long line, kept for its dead letter


_CHUNK = 1 << 16
# Decoding failures that mean bad compressed data. Storage failures never show up as these: the raw
# handle turns them into _Unreadable first (BZ2File reports bad data with a plain OSError).
_CORRUPT = (OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


class _Unreadable(Exception):
    """The storage failed to give the file's bytes (as opposed to the bytes being bad)."""


class _Expanded(Exception):
    """A compressed file decodes to more than its bound (see read_lines)."""


class _Raw(io.RawIOBase):
    """A file's bytes as stored, with every storage error raised as _Unreadable."""

    def __init__(self, handle: BinaryIO):
        super().__init__()
        self._handle = handle
        self.consumed = 0  # bytes read from storage

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._handle.read(len(buffer))
        except Exception as error:  # OSError locally, google.api_core errors on gs://
            raise _Unreadable(error) from error
        buffer[: len(data)] = data
        self.consumed += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._handle.close()
            except Exception as error:
                raise _Unreadable(error) from error
            finally:
                super().close()


class _Streams(io.RawIOBase):
    """Concatenated deflate or zstd streams. Beam's decoder stops quietly where a file is cut; this
    raises EOFError there, as GzipFile, BZ2File and LZMAFile do."""

    def __init__(self, raw: io.RawIOBase, new_decoder: Callable[[], Any]):
        super().__init__()
        self._raw, self._new_decoder = raw, new_decoder
        self._decoder: Any = None
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._out):
            ended = self._decoder is None or self._decoder.eof
            data = (self._decoder.unused_data if self._decoder is not None and ended else b"") or \
                self._raw.read(_CHUNK)
            if not data:
                if not ended:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                return 0
            if ended:
                self._decoder = self._new_decoder()
            self._out, self._at = self._decoder.decompress(data), 0
        size = min(len(buffer), len(self._out) - self._at)
        buffer[:size] = self._out[self._at: self._at + size]
        self._at += size
        return size


class _Bounded(io.RawIOBase):
    """Decoded bytes, at most `ratio` per compressed byte read (past EXPANSION_FREE_BYTES): a
    decompression bomb stops at its bound instead of running on for hours."""

    def __init__(self, decoded: BinaryIO, raw: _Raw, ratio: int):
        super().__init__()
        self._decoded, self._raw, self._ratio = decoded, raw, ratio
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = self._decoded.readinto1(buffer)  # what one decoding step gives: nothing decoded is held back
        if not size and not self._raw.consumed:
            raise EOFError("the file is empty, which no compressor writes")
        self.produced += size
        if self.produced > max(EXPANSION_FREE_BYTES, self._ratio * self._raw.consumed):
            raise _Expanded(f"{self.produced} bytes decoded from {self._raw.consumed} compressed bytes, over "
                            f"{self._ratio}x (--max_expansion)")
        return size

    def close(self) -> None:
        if not self.closed:
            try:
                self._decoded.close()
            finally:
                super().close()


def _decoded(raw: _Raw, path: str, max_expansion: int = MAX_EXPANSION) -> BinaryIO:
    """The file's lines as bytes, decompressed by its name's suffix like Beam does, by decoders that
    report a cut or damaged stream instead of ending quietly, within `max_expansion`."""
    decoder = _decoder(raw, path)
    if decoder is None:
        return io.BufferedReader(raw)
    return io.BufferedReader(_Bounded(decoder, raw, max_expansion), _CHUNK)


def _decoder(raw: io.RawIOBase, path: str) -> BinaryIO | None:
    """The decompressing reader for the file's suffix, or None for an uncompressed file."""
    kind = CompressionTypes.detect_compression_type(path)
    if kind == CompressionTypes.GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # multi-member; EOFError when cut
    if kind == CompressionTypes.BZIP2:
        return bz2.BZ2File(raw)
    if kind == CompressionTypes.LZMA:
        return lzma.LZMAFile(raw)
    if kind == CompressionTypes.DEFLATE:
        return io.BufferedReader(_Streams(raw, zlib.decompressobj))
    if kind == CompressionTypes.ZSTD:
        return io.BufferedReader(_Streams(raw, lambda: zstandard.ZstdDecompressor().decompressobj()))
    return None


def printable_path(path: str) -> str:
    """The path as valid UTF-8 text: undecodable name bytes (surrogate escapes) become \\xNN."""
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _refusal(path: str) -> tuple[str, str] | None:
    """(reason, why) for a path that must not be opened at all, checked before opening it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "bad_file_name", "the file name is not valid UTF-8; not read"
    if FileSystems.get_scheme(path) is None:  # local: a FIFO would block open, a directory fail it
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            return "unreadable_file", f"cannot stat: {error}"
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO, socket or device"
            return "not_a_file", f"a {kind}, not a regular file; not opened"
    return None


def _lines(stream: BinaryIO, limit: int) -> Iterator[tuple[bytes, int]]:
    """(line, 0), or for a line over `limit` bytes (its start, its length): no line is held whole
    past the limit."""
    while line := stream.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line, 0
            continue
        size, start = len(line), line[:_KEPT_OF_A_LONG_LINE]
        while not line.endswith(b"\n") and (line := stream.readline(1 << 20)):
            size += len(line)
        yield start, size


def read_lines(path: str, max_line_bytes: int = MAX_LINE_BYTES,
               max_expansion: int = MAX_EXPANSION) -> Iterator[SourceLine | DeadLetter]:
    """Streams one file (local or gs://, compressed by suffix) line by line: memory does not grow
    with it. Blank lines are counted, not yielded; if the file fails, ends with one DeadLetter (see
    the module docstring)."""
    count = 0
    blank = _BlankLines(path)
    refusal = _refusal(path)
    if refusal:
        yield _dead_letter(path, *refusal, count)
        return
    failure = None
    try:
        try:
            handle = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
        except Exception as error:  # OSError locally, google.api_core errors on gs://
            raise _Unreadable(error) from error
        # The decoders do not close a handle they were given: the outer `with` does.
        with _Raw(handle) as raw, _decoded(raw, path, max_expansion) as lines:
            for line, too_long in _lines(lines, max_line_bytes):
                count += 1
                if not blank.skips(line, too_long, count):
                    yield SourceLine(path, count, line.rstrip(b"\r\n"), too_long)
    except _Unreadable as error:
        failure = _dead_letter(path, "unreadable_file", f"cannot read: {error}", count)
    except EOFError as error:
        failure = _dead_letter(path, "truncated_file",
                               f"compressed data ends before its end marker ({error}); the bytes after "
                               "the last complete line are dropped", count)
    except _Expanded as error:
        failure = _dead_letter(path, "expansion_too_large", f"{error}; not read further", count)
    except _CORRUPT as error:
        failure = _dead_letter(path, "corrupt_file", f"bad compressed data: {error}", count)
    if blank.count:
        yield blank.dead_letter()
    if failure:
        yield failure


class _BlankLines:
    """A file's lines of nothing but ASCII whitespace, counted instead of passed on."""

    def __init__(self, path: str):
        self._path, self.count, self._first = path, 0, 0

    def skips(self, line: bytes, too_long: int, number: int) -> bool:
        if too_long or line.strip():
            return False
        self.count += 1
        self._first = self._first or number
        return True

    def dead_letter(self) -> DeadLetter:
        """One for all of them: its line number is their count."""
        name = printable_path(self._path)
        return DeadLetter(name, self.count, "read", "blank_lines",
                          f"{name}: {self.count} blank lines (the first is line {self._first}), skipped")


def _dead_letter(path: str, reason: str, why: str, count: int) -> DeadLetter:

    detail = f"{printable_path(path)}: {why}; {count} lines read before the failure"
    return DeadLetter(printable_path(path), count, "read", reason,
                      detail.encode("utf-8", "backslashreplace").decode("utf-8"))


# The predecessor's sharded dataset: DIR/master_metadata.json and DIR/shard_NNN/chunk_*.jsonl.
SHARDED_DATASET_MARKER = "master_metadata.json"
SHARDED_DATASET_FILES = "shard_*/chunk_*.jsonl"


# Directories named as --input, by the file that marks them: their data files. `datasets`'
# save_to_disk writes DIR/state.json and DIR/data-*.arrow, for a DatasetDict one such DIR per split.
DATASET_DIRECTORIES = ((SHARDED_DATASET_MARKER, SHARDED_DATASET_FILES), ("state.json", "data-*.arrow"),
                       ("dataset_dict.json", "*/data-*.arrow"))


def expand_input(pattern: str) -> str:
    """A glob as given, or the data files of a dataset directory (DATASET_DIRECTORIES)."""
    directory = pattern.rstrip("/")
    for marker, files in DATASET_DIRECTORIES:
        if FileSystems.exists(f"{directory}/{marker}"):
            return f"{directory}/{files}"
    return pattern


def absolute_input(given: str) -> str:
    """--input as a job reads it and names its samples by: an old-layout dataset directory's chunk
    files, a local glob made absolute."""
    pattern = expand_input(given)
    return pattern if "://" in pattern else os.path.abspath(pattern)


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


class _ReadFile(beam.DoFn):
    """A file's lines on the main output and its dead letter, if any, on DEAD_LETTER; both keep the
    path's timestamp and window."""

    def __init__(self, max_line_bytes: int, max_expansion: int):
        self._max_line_bytes, self._max_expansion = max_line_bytes, max_expansion

    def process(self, path: str):
        for item in read_lines(path, self._max_line_bytes, self._max_expansion):
            if isinstance(item, SourceLine):
                yield item
            else:
                Metrics.counter("read", item.reason).inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, item)


class ReadLines(beam.PTransform):
    """File paths -> `lines` (a SourceLine per line) and DEAD_LETTER (one DeadLetter per file that
    failed, see the module docstring): `read = paths | ReadLines(); read.lines; read[DEAD_LETTER]`.
    A line over `max_line_bytes` arrives as its start with `too_long` set, for the parser to
    dead-letter."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES, max_expansion: int = MAX_EXPANSION):
        super().__init__()
        self._max_line_bytes, self._max_expansion = max_line_bytes, max_expansion

    def expand(self, paths):
        read = (
            paths
            | "SpreadFiles" >> beam.Reshuffle()
            | "Lines" >> beam.ParDo(_ReadFile(self._max_line_bytes, self._max_expansion)).with_outputs(DEAD_LETTER, main="lines")
        )
        # A file is read by one worker (a compressed one cannot be split), but its lines are spread
        # over all of them before parsing and tokenizing, whatever the number of files: parsing and
        # tokenizing cost far more than reading, and would otherwise fuse onto the reader.
        return _Read(read.lines | "SpreadLines" >> beam.Reshuffle(), read[DEAD_LETTER])


class _Read(typing.NamedTuple):
    """ReadLines' outputs, taken as from a ParDo's: `read.lines`, `read[DEAD_LETTER]`."""

    lines: beam.PCollection
    dead_letters: beam.PCollection

    def __getitem__(self, tag):
        return self.dead_letters if tag == DEAD_LETTER else tuple.__getitem__(self, tag)
