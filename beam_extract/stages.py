"""Thin Beam wrappers around the pure per-record steps; failures go to the dead-letter output."""

from __future__ import annotations

from collections.abc import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_extract.extract import DEAD_LETTER
from beam_extract.io.sources import SourceLine
from beam_extract.model.weights import resolve_model_dir
from beam_extract.records import DeadLetter, parse_line
from beam_extract.tokenize import load_tokenizer, to_samples


def route(results: Iterable, stage: str):
    """Sends DeadLetters to the tagged output (counted by stage and reason), the rest to the main one."""
    for result in results:
        if isinstance(result, DeadLetter):
            Metrics.counter(f"dead_letter.{stage}", result.reason).inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, result)
        else:
            Metrics.counter(stage, "out").inc()
            yield result


class ParseDoFn(beam.DoFn):
    def __init__(self, input_format: str, text_field: str):
        self._input_format, self._text_field = input_format, text_field

    def process(self, line: SourceLine):
        yield from route([parse_line(line, self._input_format, self._text_field)], "parse")


class TokenizeDoFn(beam.DoFn):
    def __init__(self, model: str, max_seq_len: int):
        self._model, self._max_seq_len = model, max_seq_len

    def setup(self):
        self._tokenizer = load_tokenizer(resolve_model_dir(self._model))

    def process(self, record):
        yield from route(to_samples(record, self._tokenizer, self._max_seq_len), "tokenize")
