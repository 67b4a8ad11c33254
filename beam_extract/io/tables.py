"""Rows of Parquet files and Arrow files (what `datasets.Dataset.save_to_disk` writes), with the
guarantees of JSONL lines: each row keeps (file, row number from 1) for ids and dead letters, a bad
row is the parser's dead letter, a bad file one read dead letter after the rows it gave.

Reading is streamed in record batches, only of the columns the job needs (the text or token
column, the id column; ARC's task_id, train and test): a Parquet file ROWS_PER_BATCH rows at a
time (memory bounded by a row group's column chunks, never the file), an Arrow stream batch by
batch as written. A Parquet file is split by row groups, each read by any worker, so one big file
spreads over many.

Beam's ReadFromParquet is not used: it reads no row numbers, and a damaged file fails the bundle
(and after the retries the job) instead of becoming a dead letter. The bytes come through Beam's
FileSystems, local or gs://.

Reason codes, as for lines (io.sources): truncated_file (a Parquet file that does not end with its
footer's magic, an Arrow stream without its end-of-stream marker or cut inside a message),
corrupt_file (anything else pyarrow cannot decode: a bad footer, page, checksum or message),
unreadable_file (the storage failed), not_a_file and bad_file_name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, BinaryIO

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_extract.io.sources import MAX_EXPANSION, MAX_LINE_BYTES, ReadLines, _refusal, printable_path, read_lines
from beam_extract.options import JobOptions
from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter
from beam_extract.records.source_line import SourceLine, SourceRow
from beam_extract.records.text import field
from beam_extract.records.tokens import TOKENS_FIELDS

PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
ROWS_PER_BATCH = 1024
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def is_table(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES + ARROW_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Columns:
    """The fields a job reads from a row (dotted: nested), and the one whose size is checked
    against --max_line_bytes (a text)."""

    wanted: tuple[str, ...]
    sized: str = ""

    def top_level(self, names: list[str]) -> list[str]:
        """The file's columns that hold the wanted fields: a column named with the dots itself, or
        the column of a dotted field's first part."""
        found = [w if w in names else w.split(".")[0] for w in self.wanted]
        return [n for n in dict.fromkeys(found) if n in names]


def columns_for(options: JobOptions) -> Columns:
    """What the job's input format and field options read from a table row."""
    fmt, ids = options.input_format, options.id_field
    if fmt == "tokens":
        return Columns((*((options.tokens_field,) if options.tokens_field else TOKENS_FIELDS), ids))
    text = () if fmt == "arc" else (options.text_field, ids)
    arc = ("task_id", "id", "train", "test") if fmt in ("arc", "auto") else ()
    return Columns((*text, *arc), options.text_field if fmt != "arc" else "")


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows of a table file one reader takes: a Parquet row group, or a whole Arrow file
    (row_group None). `first_row`: the 1-based number of its first row in the file."""

    path: str
    row_group: int | None = None
    first_row: int = 1
    rows: int = 0  # in the part (Parquet; 0: not known before reading)


class _Storage:
    """A file handle that remembers a storage error while reading (pyarrow re-raises it as its
    own), so that a failing disk or GCS is told apart from bad bytes."""

    _READS = ("read", "readinto", "read1", "readall")

    def __init__(self, handle: BinaryIO | None, error: Exception | None = None):
        self._handle, self.error = handle, error

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._handle, name)
        if name not in self._READS:
            return attribute

        def read(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except Exception as error:  # OSError locally, google.api_core errors on gs://
                self.error = self.error or error
                raise
        return read

    def __enter__(self):
        return self

    def __exit__(self, *_):
        try:
            self._handle.close()
        except Exception as error:
            self.error = self.error or error


class _Unopened(Exception):
    """The storage failed to open the file: `handle` holds the error."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.handle = _Storage(None, error)


def _open(path: str) -> _Storage:
    try:
        return _Storage(FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED))
    except Exception as error:  # OSError locally, google.api_core errors on gs:// (Beam wraps some)
        raise _Unopened(error) from error


def _tail(handle: _Storage, size: int) -> bytes | None:
    """The file's last `size` bytes (None: the storage failed to give them)."""
    try:
        end = handle.seek(0, 2)
        handle.seek(max(0, end - size))
        return handle.read(size)
    except Exception as error:
        handle.error = handle.error or error
        return None


def _bytes_left(handle: _Storage) -> int:
    """How many bytes of the file follow the position reading stopped at."""
    at = handle.tell()
    return handle.seek(0, 2) - at


def _dead_letter(path: str, reason: str, why: str, rows: int, part: Part | None = None) -> DeadLetter:
    """A read dead letter, numbered as io.sources' are: by the rows read before the failure."""
    where = f"row group {part.row_group} (rows {part.first_row} to {part.first_row + part.rows - 1})" \
        if part is not None and part.row_group is not None else "the file"
    detail = f"{printable_path(path)}: {why}; {rows} rows of {where} read before the failure"
    before = (part.first_row - 1 if part is not None else 0) + rows
    return DeadLetter(printable_path(path), before, "read", reason,
                      detail.encode("utf-8", "backslashreplace").decode("utf-8"))


def _failure(path: str, handle: _Storage, error: Exception, rows: int, part: Part | None,
             truncated: str | None) -> DeadLetter:
    if handle.error is not None:
        return _dead_letter(path, "unreadable_file", f"cannot read: {handle.error}", rows, part)
    if truncated:
        return _dead_letter(path, "truncated_file", truncated, rows, part)
    return _dead_letter(path, "corrupt_file", f"cannot decode it: {str(error)[:300]}", rows, part)


def parquet_parts(path: str) -> Iterator[Part | DeadLetter]:
    """The row groups of a Parquet file, from its footer (a few kB read, not the data), or the
    file's dead letter."""
    refusal = _refusal(path)
    if refusal:
        yield _dead_letter(path, *refusal, 0)
        return
    try:
        with _open(path) as handle:
            try:
                metadata = pq.ParquetFile(handle).metadata
            except Exception as error:
                cut = handle.error is None and _tail(handle, len(_PARQUET_MAGIC)) not in (None, _PARQUET_MAGIC)
                yield _failure(path, handle, error, 0, None,
                               "the file does not end with Parquet's footer: it was cut" if cut else None)
                return
    except _Unopened as failed:
        yield _failure(path, failed.handle, failed, 0, None, None)
        return
    first = 1
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if rows:
            yield Part(path, group, first, rows)
        first += rows


def _values(batch: pa.RecordBatch, names: list[str]) -> list[dict]:
    """Each row as {column: value}; a file without any wanted column still has its rows (each a
    missing_field dead letter for the parser), never none."""
    if not names:
        return [{} for _ in range(batch.num_rows)]
    return [dict(zip(names, values)) for values in zip(*(batch.column(name).to_pylist() for name in names))]


def _as_text(array: pa.Array | None) -> pa.Array | None:
    """A column of strings in a type Arrow's string kernels take (dictionary-encoded columns, as
    pandas' categories are written, decoded; string views as large strings), or None for another type."""
    if array is not None and pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if array is not None and pa.types.is_string_view(array.type):
        array = array.cast(pa.large_string())
    if array is None or not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return None
    return array


def _text_column(batch: pa.RecordBatch, sized: str) -> pa.Array | None:
    """The text at `sized` (a column, or a dotted path into struct columns) as strings, or None
    where the batch has no string there (the parser then names the row's problem)."""
    names = batch.schema.names
    head, *rest = [sized] if sized in names or not sized else sized.split(".")
    array = batch.column(head) if head in names else None
    for part in rest:
        if array is None or not pa.types.is_struct(array.type) or array.type.get_field_index(part) < 0:
            return None
        array = pc.struct_field(array, part)
    return _as_text(array)


def _rows(batches: Iterator[pa.RecordBatch], part: Part, columns: Columns, limit: int) -> Iterator[SourceRow]:
    """Each row of each batch; a text over `limit` UTF-8 bytes comes as its start only, with its
    size (a line_too_long dead letter for the parser). Sizes are computed by Arrow on the column,
    and a long text is cut there, before any row becomes Python values: a small compressed file
    holding one huge text costs its row group's Arrow memory, not Python strings of it too."""
    number = part.first_row
    for batch in batches:
        text = _text_column(batch, columns.sized)
        sizes = [0] * batch.num_rows if text is None else pc.binary_length(text).fill_null(0).to_pylist()
        if text is not None and columns.sized in batch.schema.names and max(sizes, default=0) > limit:
            too_long = pc.greater(pc.binary_length(text).fill_null(0), limit)
            cut = pc.if_else(too_long, pc.utf8_slice_codeunits(text, 0, 4096), text)
            batch = pa.RecordBatch.from_arrays(
                [cut if name == columns.sized else batch.column(name) for name in batch.schema.names],
                names=batch.schema.names)
        rows = _values(batch, columns.top_level(batch.schema.names))
        for row, size in zip(rows, sizes):
            if size > limit:
                yield SourceRow(part.path, number, {columns.sized: field(row, columns.sized)[:4096]}, size, size)
            else:
                yield SourceRow(part.path, number, row, size=size)
            number += 1


def read_part(part: Part, columns: Columns, limit: int = MAX_LINE_BYTES) -> Iterator[SourceRow | DeadLetter]:
    """A Parquet row group's or an Arrow file's rows in record batches; if the part fails, ends
    with one DeadLetter (see the module docstring)."""
    path, read = part.path, 0
    refusal = _refusal(path)
    if refusal:
        yield _dead_letter(path, *refusal, 0, part)
        return
    truncated, stream = None, False
    try:
        with _open(path) as handle:
            try:
                if part.row_group is not None:
                    table = pq.ParquetFile(handle, page_checksum_verification=True)
                    names = columns.top_level(table.schema_arrow.names)
                    batches = table.iter_batches(ROWS_PER_BATCH, row_groups=[part.row_group], columns=names)
                else:
                    stream = handle.read(len(_ARROW_FILE_MAGIC)) != _ARROW_FILE_MAGIC
                    if stream and _tail(handle, len(_ARROW_END_OF_STREAM)) not in (None, _ARROW_END_OF_STREAM):
                        truncated = "the Arrow stream has no end-of-stream marker: it was cut"
                    handle.seek(0)
                    batches = _arrow_batches(handle, stream)
                for row in _rows(batches, part, columns, limit):
                    read += 1
                    yield row
                left = _bytes_left(handle) if part.row_group is None and stream else 0
                if left:  # Arrow's reader stops at the first end-of-stream marker, silently
                    yield _dead_letter(path, "corrupt_file", f"{left} bytes follow the Arrow stream's end-of-stream "
                                       "marker (a second stream, or bytes appended): they are not read", read, part)
                elif truncated or handle.error is not None:
                    yield _failure(path, handle, EOFError(), read, part, truncated)
            except Exception as error:
                yield _failure(path, handle, error, read, part, truncated)
    except _Unopened as failed:
        yield _failure(path, failed.handle, failed, read, part, None)


def _arrow_batches(handle: _Storage, stream: bool) -> Iterator[pa.RecordBatch]:
    if stream:
        yield from pa.ipc.open_stream(handle)
        return
    reader = pa.ipc.open_file(handle)
    for index in range(reader.num_record_batches):
        yield reader.get_batch(index)


def table_parts(path: str) -> Iterator[Part | DeadLetter]:
    """The parts readers take of one table file."""
    if path.lower().endswith(PARQUET_SUFFIXES):
        yield from parquet_parts(path)
    else:
        yield Part(path)


def read_records(path: str, columns: Columns, max_line_bytes: int = MAX_LINE_BYTES,
                 max_expansion: int = MAX_EXPANSION) -> Iterator[SourceLine | SourceRow | DeadLetter]:
    """A file's lines or rows, in order, by its name (what the job reads of it, in one process)."""
    if not is_table(path):
        yield from read_lines(path, max_line_bytes, max_expansion)
        return
    for part in table_parts(path):
        yield from [part] if isinstance(part, DeadLetter) else read_part(part, columns, max_line_bytes)


def _routed(items):
    for item in items:
        if isinstance(item, DeadLetter):
            Metrics.counter("read", item.reason).inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, item)
        else:
            yield item


class _SplitTable(beam.DoFn):
    def process(self, path: str):
        yield from _routed(table_parts(path))


class _ReadPart(beam.DoFn):
    def __init__(self, columns: Columns, max_line_bytes: int):
        self._columns, self._max_line_bytes = columns, max_line_bytes

    def process(self, part: Part):
        yield from _routed(read_part(part, self._columns, self._max_line_bytes))


class ReadInput(beam.PTransform):
    """File paths -> {"lines": SourceLines and SourceRows, DEAD_LETTER: one DeadLetter per file or
    row group that failed}. JSONL goes through io.sources.ReadLines; Parquet and Arrow files are
    split into parts (row groups), spread over workers and read in record batches."""

    def __init__(self, columns: Columns, max_line_bytes: int = MAX_LINE_BYTES, max_expansion: int = MAX_EXPANSION):
        super().__init__()
        self._columns, self._max_line_bytes, self._max_expansion = columns, max_line_bytes, max_expansion

    def expand(self, paths):
        lines, tables = paths | "TablesApart" >> beam.Partition(lambda path, _: int(is_table(path)), 2)
        read = lines | "ReadLines" >> ReadLines(self._max_line_bytes, self._max_expansion)
        parts = (tables | "SpreadTables" >> beam.Reshuffle()
                 | "TableParts" >> beam.ParDo(_SplitTable()).with_outputs(DEAD_LETTER, main="parts"))
        rows = (parts.parts | "SpreadParts" >> beam.Reshuffle()
                | "Rows" >> beam.ParDo(_ReadPart(self._columns, self._max_line_bytes))
                .with_outputs(DEAD_LETTER, main="rows"))
        return {"lines": (read.lines, rows.rows) | "LinesAndRows" >> beam.Flatten(),
                DEAD_LETTER: (read[DEAD_LETTER], parts[DEAD_LETTER], rows[DEAD_LETTER])
                | "ReadDeadLetters" >> beam.Flatten()}
