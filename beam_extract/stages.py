"""Thin Beam wrappers around the pure per-record steps; failures go to the dead-letter output."""

from __future__ import annotations

from collections.abc import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_extract.arc.augment import views
from beam_extract.arc.encoders import parse_encoder
from beam_extract.arc.prompt import load_template
from beam_extract.extract import DEAD_LETTER
from beam_extract.io.sources import SourceLine
from beam_extract.model.weights import resolve_model_dir
from beam_extract.records import DeadLetter, parse_line
from beam_extract.records.arc import ArcTask
from beam_extract.tokenize import PromptSettings, Sample, load_tokenizer, to_samples


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


def expand_views(record, seed: int, views_per_task: int) -> list:
    """ARC tasks become their augmented views; text documents pass through."""
    return views(record, seed, views_per_task) if isinstance(record, ArcTask) else [record]


class TokenizeDoFn(beam.DoFn):
    def __init__(self, model: str, max_seq_len: int, prompt_template: str, grid_encoder: str, include_answer: bool):
        self._model, self._max_seq_len = model, max_seq_len
        self._prompt = (prompt_template, grid_encoder, include_answer)
        self._dropped = Metrics.counter("arc", "train_examples_dropped")
        self._fitted = Metrics.counter("arc", "prompts_fitted_by_dropping")

    def setup(self):
        self._tokenizer = load_tokenizer(resolve_model_dir(self._model, weights=False))
        template, encoder, include_answer = self._prompt
        self._settings = PromptSettings(load_template(template), encoder, parse_encoder(encoder), include_answer)

    def process(self, record):
        results = to_samples(record, self._tokenizer, self._settings, self._max_seq_len)
        for result in results:
            if isinstance(result, Sample) and result.train_dropped:
                self._dropped.inc(result.train_dropped)
                self._fitted.inc()
        yield from route(results, "tokenize")
