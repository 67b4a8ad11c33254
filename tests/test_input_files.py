"""Per-file input failures: each bad file gives its readable lines and one dead letter, never a
crash, a hang or a silent loss. Every case builds the real file on disk (or on the GCS emulator)."""

import bz2
import contextlib
import gzip
import json
import lzma
import os
import random
import signal
import zlib

import apache_beam as beam
import pytest
import zstandard
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.util import assert_that, equal_to

from beam_extract.io.sources import ReadLines, read_lines
from beam_extract.records.source_line import SourceLine
from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter


def lines(n: int = 2000) -> list[bytes]:
    """JSONL with varied content, so that a compressed file is long enough to cut in the middle."""
    rng = random.Random(7)
    return [json.dumps({"id": i, "text": " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "eps"))
                                                    + str(rng.randrange(1000)) for _ in range(12))}).encode()
            for i in range(n)]


def joined(rows: list[bytes]) -> bytes:
    return b"".join(row + b"\n" for row in rows)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails a test that would hang (e.g. opening a FIFO blocks until a writer comes)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read(path) -> tuple[list[SourceLine], list[DeadLetter]]:
    with deadline(20):
        items = list(read_lines(str(path)))
    good = [i for i in items if isinstance(i, SourceLine)]
    bad = [i for i in items if isinstance(i, DeadLetter)]
    assert items == good + bad and len(bad) <= 1, "at most one dead letter, after the lines"
    for letter in bad:
        assert letter.stage == "read" and letter.line_number == len(good)
        assert f"{len(good)} lines read" in letter.detail and letter.source in letter.detail
        assert json.loads(letter.to_json())["reason"] == letter.reason
        for text in (letter.to_json(), letter.source, letter.detail):
            text.encode("utf-8")  # no lone surrogate: WriteToText and protobuf can write it
    return good, bad


def only_reason(bad: list[DeadLetter]) -> str:
    assert len(bad) == 1, bad
    return bad[0].reason


def assert_complete_prefix(good: list[SourceLine], path, rows: list[bytes]) -> None:
    """The lines read are the file's first lines, whole, in order, numbered from 1."""
    assert [line.data for line in good] == rows[: len(good)]
    assert [line.line_number for line in good] == list(range(1, len(good) + 1))
    assert all(line.path == str(path) for line in good)


def test_good_jsonl_and_gz_read_whole(tmp_path):
    rows = lines(50)
    (tmp_path / "a.jsonl").write_bytes(joined(rows)[:-1])  # a last line without newline is kept
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(joined(rows)))
    for name in ("a.jsonl", "a.jsonl.gz"):
        good, bad = read(tmp_path / name)
        assert bad == [] and len(good) == 50
        assert_complete_prefix(good, tmp_path / name, rows)


def test_multi_member_gz_and_other_suffixes_read_whole(tmp_path):
    rows = lines(300)
    (tmp_path / "m.jsonl.gz").write_bytes(b"".join(gzip.compress(joined(rows[i:i + 100])) for i in (0, 100, 200)))
    (tmp_path / "m.jsonl.bz2").write_bytes(bz2.compress(joined(rows[:150])) + bz2.compress(joined(rows[150:])))
    (tmp_path / "m.jsonl.xz").write_bytes(lzma.compress(joined(rows)))
    (tmp_path / "m.jsonl.deflate").write_bytes(zlib.compress(joined(rows)))
    zstd = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(zstd.compress(joined(rows[:10])) + zstd.compress(joined(rows[10:])))
    for name in ("m.jsonl.gz", "m.jsonl.bz2", "m.jsonl.xz", "m.jsonl.deflate", "m.jsonl.zst"):
        good, bad = read(tmp_path / name)
        assert bad == [] and len(good) == 300, name
        assert_complete_prefix(good, tmp_path / name, rows)


@pytest.mark.parametrize("suffix, compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress), (".deflate", zlib.compress),
    (".zst", zstandard.ZstdCompressor().compress)])
def test_truncated_file_gives_complete_lines_then_truncated_file(tmp_path, suffix, compress):
    rows = lines()
    whole = compress(joined(rows))
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(whole[: len(whole) // 2])
    good, bad = read(path)
    assert only_reason(bad) == "truncated_file"
    assert len(good) < len(rows)
    assert len(good) > 0 or suffix in (".bz2", ".zst")  # these decode whole blocks (900 kB, 128 kB) only
    assert_complete_prefix(good, path, rows)  # a strict prefix, the cut last line not among them


def test_truncated_gz_drops_a_cut_last_line(tmp_path):
    """Decoded data that ends inside a line: that line is not yielded, even without a newline to lose."""
    rows = lines(20)
    whole = gzip.compress(joined(rows), compresslevel=0)  # stored: byte offsets map to text offsets
    decoded_end = whole.index(rows[10]) + 5  # the cut falls inside line 11
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[:decoded_end])
    good, bad = read(path)
    assert only_reason(bad) == "truncated_file" and len(good) == 10
    assert_complete_prefix(good, path, rows)


def test_gz_with_flipped_bytes_is_corrupt_or_truncated_and_deterministic(tmp_path):
    rows = lines()
    data = bytearray(gzip.compress(joined(rows)))
    middle = len(data) // 2
    data[middle: middle + 16] = bytes(b ^ 0xFF for b in data[middle: middle + 16])
    path = tmp_path / "flipped.jsonl.gz"
    path.write_bytes(bytes(data))
    first, second = read(path), read(path)
    assert first == second
    assert only_reason(first[1]) in ("corrupt_file", "truncated_file")
    assert len(first[0]) < len(rows)


def test_gz_with_bad_crc_is_corrupt(tmp_path):
    rows = lines(30)
    data = bytearray(gzip.compress(joined(rows)))
    data[-8] ^= 0xFF  # the CRC32 in the trailer
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(bytes(data))
    good, bad = read(path)
    assert only_reason(bad) == "corrupt_file" and "CRC" in bad[0].detail
    assert_complete_prefix(good, path, rows)  # decoded before the check at the member's end


def test_plain_text_named_gz_is_corrupt(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(joined(lines(5)))
    good, bad = read(path)
    assert good == [] and only_reason(bad) == "corrupt_file"


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    good, bad = read(tmp_path / "d.jsonl")
    assert good == [] and only_reason(bad) == "not_a_file" and "directory" in bad[0].detail


def test_fifo_is_not_a_file_and_never_opened(tmp_path):
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    good, bad = read(path)  # opening it would block: read() fails on its deadline instead of hanging
    assert good == [] and only_reason(bad) == "not_a_file"


def test_name_that_is_not_utf8_is_a_bad_file_name(tmp_path):
    name = os.fsencode(tmp_path) + b"/bad\xff.jsonl"
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))
    path = os.fsdecode(name)  # what a glob gives: a str with a surrogate escape
    good, bad = read(path)
    assert good == [] and only_reason(bad) == "bad_file_name"
    assert bad[0].source == str(tmp_path) + "/bad\\xff.jsonl"


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.jsonl"
    path.write_bytes(joined(lines(3)))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: another real unreadable file, an I/O error on read
        path.unlink()
        path.symlink_to("/proc/self/mem")  # a regular file whose read at offset 0 is EIO
    good, bad = read(path)
    assert good == [] and only_reason(bad) == "unreadable_file"


def test_file_vanished_after_the_match_is_unreadable(tmp_path):
    path = tmp_path / "gone.jsonl.gz"
    path.write_bytes(gzip.compress(joined(lines(3))))
    (matched,) = [m.path for m in FileSystems.match([str(tmp_path / "*.gz")])[0].metadata_list]
    path.unlink()
    good, bad = read(matched)
    assert good == [] and only_reason(bad) == "unreadable_file"


def test_pipeline_sends_lines_and_one_dead_letter_per_bad_file(tmp_path):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    rows = lines()
    (tmp_path / "good.jsonl").write_bytes(joined(rows[:40]))
    whole = gzip.compress(joined(rows))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    cut_lines, _ = read(tmp_path / "cut.jsonl.gz")
    # Beam's local glob lists the FIFO but not the directory; a directory is matched when named exactly.
    paths = [m.path for pattern in (str(tmp_path / "*.jsonl*"), str(tmp_path / "dir.jsonl"))
             for m in FileSystems.match([pattern])[0].metadata_list]
    assert sorted(os.path.basename(p) for p in paths) == ["cut.jsonl.gz", "dir.jsonl", "good.jsonl", "pipe.jsonl"]

    with deadline(120), beam.Pipeline(runner=FnApiRunner()) as pipeline:
        result = pipeline | beam.Create(paths) | ReadLines()
        assert_that(result.lines | beam.Map(lambda line: (os.path.basename(line.path), line.line_number, line.data)),
                    equal_to([("good.jsonl", i + 1, row) for i, row in enumerate(rows[:40])]
                             + [("cut.jsonl.gz", i + 1, row) for i, row in enumerate(rows[: len(cut_lines)])]),
                    label="Lines")
        assert_that(result[DEAD_LETTER] | beam.Map(lambda d: (os.path.basename(d.source), d.reason, d.line_number)),
                    equal_to([("cut.jsonl.gz", "truncated_file", len(cut_lines)), ("dir.jsonl", "not_a_file", 0),
                              ("pipe.jsonl", "not_a_file", 0)]),
                    label="DeadLetters")
    counters = {c.key.metric.name: c.committed
                for c in pipeline.result.metrics().query()["counters"] if c.key.metric.namespace == "read"}
    assert counters == {"truncated_file": 1, "not_a_file": 2}


def test_truncated_gz_on_gcs(gcs_bucket):
    from apache_beam.io.filesystem import CompressionTypes

    rows = lines()
    whole = gzip.compress(joined(rows))
    # Not conftest.upload_dir: its FileSystems.create would gzip a .gz name once more.
    for name, data in (("cut.jsonl.gz", whole[: len(whole) // 2]), ("good.jsonl.gz", whole)):
        with FileSystems.create(f"{gcs_bucket}/input-files/{name}",
                                compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
    good, bad = read(f"{gcs_bucket}/input-files/good.jsonl.gz")
    assert bad == [] and len(good) == len(rows)
    path = f"{gcs_bucket}/input-files/cut.jsonl.gz"
    good, bad = read(path)
    assert only_reason(bad) == "truncated_file" and 0 < len(good) < len(rows)
    assert_complete_prefix(good, path, rows)
    good, bad = read(f"{gcs_bucket}/input-files/missing.jsonl.gz")
    assert good == [] and only_reason(bad) == "unreadable_file"


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".deflate", ".bz2", ".xz"])
def test_an_empty_compressed_file_is_truncated(tmp_path, suffix):
    """No compressor writes an empty file: zero bytes named .gz are a cut file, not an empty input."""
    path = tmp_path / f"empty.jsonl{suffix}"
    path.write_bytes(b"")
    good, bad = read(path)
    assert good == [] and only_reason(bad) == "truncated_file"


def test_an_empty_plain_file_is_empty(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert read(tmp_path / "empty.jsonl") == ([], [])


def test_blank_lines_are_counted_in_one_dead_letter(tmp_path):
    """A million blank lines gave a million dead letters (149 MB): now one, counting them. (As a
    1 KB .gz they are past the expansion bound, below.)"""
    rows = lines(3)
    data = joined(rows[:1]) + b"\n" * 500_000 + b"  \t\r\n" + joined(rows[1:]) + b"\n" * 499_999
    path = tmp_path / "blank.jsonl"
    path.write_bytes(data)
    with deadline(20):
        items = list(read_lines(str(path)))
    *good, letter = items
    assert [(line.line_number, line.data) for line in good] == [(1, rows[0]), (500_003, rows[1]), (500_004, rows[2])]
    assert (letter.reason, letter.stage, letter.line_number) == ("blank_lines", "read", 1_000_000)
    assert "1000000 blank lines (the first is line 2)" in letter.detail


def test_blank_lines_then_a_cut_give_both_dead_letters(tmp_path):
    whole = gzip.compress(b"\n" * 10 + joined(lines()))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    items = list(read_lines(str(path)))
    blank, cut = items[-2:]
    assert (blank.reason, blank.line_number) == ("blank_lines", 10)
    assert cut.reason == "truncated_file" and cut.line_number == len(items) - 2 + 10


@pytest.mark.parametrize("suffix, compress", [(".gz", lambda d: gzip.compress(d, 9)), (".xz", lzma.compress),
                                              (".zst", zstandard.ZstdCompressor(level=19).compress)])
def test_a_compressed_file_past_its_expansion_bound_stops_there(tmp_path, suffix, compress):
    """A decompression bomb (10 MB of lines from a few KB) is read up to --max_expansion times its
    compressed bytes, then one dead letter: never hours of reading nor millions of dead letters."""
    from beam_extract.io.sources import EXPANSION_FREE_BYTES

    path = tmp_path / f"bomb.jsonl{suffix}"
    path.write_bytes(compress(b"x\n" * 5_000_000))
    with deadline(20):
        items = list(read_lines(str(path), max_expansion=100))
    *good, letter = items
    assert letter.reason == "expansion_too_large" and letter.line_number == len(good)
    bound = max(EXPANSION_FREE_BYTES, 100 * path.stat().st_size) + (1 << 16)  # + the decoders' read-ahead
    assert 0 < len(good) * 2 <= bound
    assert all(line.data == b"x" for line in good)


def test_a_small_gz_of_a_million_blank_lines_is_one_bounded_read(tmp_path):
    path = tmp_path / "blank.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" * 1_000_000, 9))
    assert path.stat().st_size < 2048
    with deadline(20):
        blank, bomb = read_lines(str(path))
    assert blank.reason == "blank_lines" and bomb.reason == "expansion_too_large"
    assert blank.line_number == bomb.line_number < 200_000


def test_compressed_text_within_the_bound_reads_whole(tmp_path):
    rows = lines(5000)
    path = tmp_path / "text.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(joined(rows)))
    good, bad = read(path)
    assert bad == [] and [line.data for line in good] == rows


def test_blank_lines_are_accounted_for(tmp_path):
    """Lines read = with samples + dead-lettered + blank: the blank ones counted from their one dead letter."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from beam_extract.accounting.invariants import line_and_sample_counts
    from beam_extract.accounting.lines import AccountLines
    from beam_extract.accounting.totals import SumCounts
    from beam_extract.records import parse_line

    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b"x\n\n\n{bad\n \n"))
    (tmp_path / "b.jsonl").write_bytes(b"\n" * 7 + b"y")
    with deadline(120), beam.Pipeline(runner=FnApiRunner()) as pipeline:
        read_ = pipeline | beam.Create([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl")]) | ReadLines()
        parsed = read_.lines | beam.Map(parse_line, "text")
        empty = pipeline | "None" >> beam.Create([])
        _, reasons, outcomes = {"read": read_[DEAD_LETTER], "parse": parsed} | AccountLines(
            str(tmp_path / "out"), empty, pipeline | "NoneResumed" >> beam.Create([]))
        read_count = read_.lines | beam.combiners.Count.Globally()
        counts = (outcomes | "SumLines" >> beam.CombineGlobally(SumCounts())
                  | beam.Map(lambda lines, n, dead: line_and_sample_counts(n, lines, 0, 0, dead),
                             beam.pvalue.AsSingleton(read_count),
                             beam.pvalue.AsSingleton(reasons | "SumReasons" >> beam.CombineGlobally(SumCounts())))
                  | beam.Map(lambda c: {k: c[k] for k in ("lines_read", "lines_dead_lettered", "lines_blank",
                                                          "lines_unaccounted", "dead_letters")}))
        assert_that(counts, equal_to([{"lines_read": 13, "lines_dead_lettered": 3, "lines_blank": 10,
                                       "lines_unaccounted": 0,
                                       "dead_letters": {"blank_lines": 2, "invalid_json": 3}}]))


def test_a_file_past_its_expansion_bound_makes_the_run_not_ok():
    from beam_extract.accounting.invariants import line_and_sample_counts, problems

    counts = line_and_sample_counts(5, {"with_samples": 5}, 5, 0, {"expansion_too_large": 1})
    counts |= {"samples_committed": 5, "samples_committed_now": 5, "samples_committed_twice": 0}
    assert problems(counts, {"expansion_too_large": 1}) == ["1 input files were not read to their end (see the read "
                                                             "dead letters)"]
