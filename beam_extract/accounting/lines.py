"""Every input line accounted for: dead letters written per stage, counted by reason, and each line
of each file marked as having produced samples or a dead letter.

Only small results (file names, counts, per-file bitmaps) are flattened, so no runner gathers every
dead letter in one place.
"""

from __future__ import annotations

import itertools

import apache_beam as beam
import numpy as np

from beam_extract.sink.writer import WriteDeadLetters

# Dead letters of whole input files: their line number counts the lines read before the failure,
# so they are not marks of one line.
FILE_STAGE = "read"
# The dead letter of a file's blank lines: its line number is how many there were (io.sources).
BLANK_LINES = "blank_lines"


def _union(a: bytes, b: bytes) -> bytes:
    size = max(len(a), len(b))
    return (np.pad(np.frombuffer(a, np.uint8), (0, size - len(a)))
            | np.pad(np.frombuffer(b, np.uint8), (0, size - len(b)))).tobytes()


class LineBitmaps(beam.CombineFn):
    """(line number, produced a sample?) of one input file -> two bitmaps of line numbers: lines
    with a sample, lines with a dead letter. A file of millions of lines costs kilobytes."""

    def create_accumulator(self):
        return bytearray(), bytearray()

    def add_input(self, acc, outcome):
        line, produced = outcome
        bits = acc[0] if produced else acc[1]
        if line >> 3 >= len(bits):
            bits.extend(bytes((line >> 3) + 1 - len(bits)))
        bits[line >> 3] |= 1 << (line & 7)
        return acc

    def merge_accumulators(self, accumulators):
        samples, dead = b"", b""
        for acc in accumulators:
            samples, dead = _union(samples, bytes(acc[0])), _union(dead, bytes(acc[1]))
        return bytearray(samples), bytearray(dead)

    def extract_output(self, acc):
        return bytes(acc[0]), bytes(acc[1])


class CountLineOutcomes(beam.CombineFn):
    """Bitmap pairs of one file (from several stages), or triples whose third marks lines with samples
    committed by the run resumed -> {with_samples, dead_lettered, skipped}. A line that produced any
    sample counts as such, even if some of its samples failed; one whose samples were all committed
    before and that nothing else happened to now is also `skipped` (re-read, not new)."""

    def create_accumulator(self):
        return b"", b"", b""

    def add_input(self, acc, bitmaps):
        return tuple(_union(mine, theirs) for mine, theirs in itertools.zip_longest(acc, bitmaps, fillvalue=b""))

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            merged = self.add_input(merged, acc)
        return merged

    def extract_output(self, acc):
        size = max(len(bits) for bits in acc)
        samples, dead, resumed = (np.pad(np.frombuffer(b, np.uint8), (0, size - len(b))) for b in acc)
        return {"with_samples": int(np.unpackbits(samples | resumed).sum()),
                "dead_lettered": int(np.unpackbits(dead & ~(samples | resumed)).sum()),
                "skipped": int(np.unpackbits(resumed & ~samples & ~dead).sum())}


class AccountLines(beam.PTransform):
    """{stage: dead letters} -> (dead-letter file paths, {reason: count} pairs, {outcome: lines}
    pairs; outcome "blank" for the blank lines the reader counted). Lines that produced samples are
    marked from `written` (the extraction's ExtractedBatches) and `resumed` (samples committed by the
    run resumed; a line with only those is also counted as "skipped")."""

    def __init__(self, output: str, written: beam.PCollection, resumed: beam.PCollection):
        super().__init__()
        self._output, self._written, self._resumed = output, written, resumed

    def expand(self, dead_by_stage: dict[str, beam.PCollection]):
        files, reasons, bitmaps = [], [], []
        for stage, letters in dead_by_stage.items():
            files.append(letters | f"WriteDeadLetters[{stage}]" >> WriteDeadLetters(self._output, stage))
            reasons.append(letters | f"Reasons[{stage}]" >> beam.Map(lambda d: d.reason)
                           | f"CountReasons[{stage}]" >> beam.combiners.Count.PerElement())
            if stage == FILE_STAGE:
                blank = (letters | "BlankLines" >> beam.Filter(lambda d: d.reason == BLANK_LINES)
                         | "CountBlank" >> beam.Map(lambda d: ("blank", d.line_number)))
            else:
                bitmaps.append(letters | f"LinesDead[{stage}]" >> beam.Map(lambda d: (d.source, (d.line_number, False)))
                               | f"BitmapsDead[{stage}]" >> beam.CombinePerKey(LineBitmaps()))
        bitmaps += [
            self._written
            | "LinesWithSample" >> beam.FlatMap(lambda batch: [(s.sample.source, (s.sample.line_number, True))
                                                               for s in batch.samples])
            | "BitmapsWritten" >> beam.CombinePerKey(LineBitmaps()),
            self._resumed
            | "LinesResumed" >> beam.Map(lambda s: (s.source, (s.line_number, True)))
            | "BitmapsResumed" >> beam.CombinePerKey(LineBitmaps())
            | "AsResumed" >> beam.MapTuple(lambda source, bits: (source, (b"", b"", bits[0]))),
        ]
        lines = (
            bitmaps
            | "AllBitmaps" >> beam.Flatten()
            | "PerFile" >> beam.CombinePerKey(CountLineOutcomes())
            | "FileCounts" >> beam.FlatMap(lambda file_counts: file_counts[1].items())
        )
        lines = (lines, blank) | "WithBlankLines" >> beam.Flatten()
        return (files | "AllDeadLetterFiles" >> beam.Flatten(), reasons | "AllReasons" >> beam.Flatten(), lines)
