"""Every input line accounted for: dead letters written per stage, counted by reason, and each line
of each file marked as having produced samples or a dead letter.

Only small results (file names, counts, per-file bitmaps) are flattened, so no runner gathers every
dead letter in one place.
"""

from __future__ import annotations

import apache_beam as beam

from beam_extract.output.manifest import CountLineOutcomes, LineBitmaps
from beam_extract.output.writer import WriteDeadLetters

# Dead letters of whole input files: their line number counts the lines read before the failure,
# so they are not marks of one line.
FILE_STAGE = "read"
# The dead letter of a file's blank lines: its line number is how many there were (io.sources).
BLANK_LINES = "blank_lines"


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
