"""Thin Beam wrappers around the pure per-record steps; failures go to the dead-letter output."""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable

import apache_beam as beam
from apache_beam.coders import StrUtf8Coder, TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import GlobalWindows

from beam_extract.arc.augment import views
from beam_extract.arc.encoders import parse_encoder
from beam_extract.arc.prompt import load_template
from beam_extract.options import JobOptions
from beam_extract.records.source_line import SourceLine, SourceRow
from beam_extract.lifetime import Driver, exit_with_driver
from beam_extract import progress
from beam_extract.model.weights import resolve_model_dir
from beam_extract.records import DeadLetter, parse_line
from beam_extract.records.dead_letter import DEAD_LETTER
from beam_extract.records.arc import ArcTask
from beam_extract.tokenize import (PromptSettings, Sample, TokenSelection, load_tokenizer, parse_positions,
                                   special_token_ids, to_samples)


@functools.cache
def counter(namespace: str, name: str):
    """One Beam counter per name for the process: made once, not per element (a counter only names
    a metric; it is counted in the container of whichever bundle increments it)."""
    return Metrics.counter(namespace, name)


def route(results: Iterable, stage: str):
    """Sends DeadLetters to the tagged output (counted by stage and reason), the rest to the main one."""
    for result in results:
        if isinstance(result, DeadLetter):
            counter(f"dead_letter.{stage}", result.reason).inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, result)
        else:
            counter(stage, "out").inc()
            yield result


class ParseDoFn(beam.DoFn):
    def __init__(self, options: JobOptions, root: str, driver: Driver | None = None):
        self._fields = (options.input_format, options.text_field, root, options.id_field,
                        options.tokens_field)
        self._driver = driver  # a local job's driver: this worker process dies with it

    def setup(self):
        exit_with_driver(self._driver)

    def process(self, line: SourceLine | SourceRow):
        size = line.size if isinstance(line, SourceRow) else (line.too_long or len(line.data)) + 1
        progress.count(self._driver, lines=1, bytes=size)
        yield from route([parse_line(line, *self._fields)], "parse")


def expand_views(record, seed: int, views_per_task: int) -> list:
    """ARC tasks become their augmented views; text documents pass through."""
    return views(record, seed, views_per_task) if isinstance(record, ArcTask) else [record]


def prompt_and_selection(options: JobOptions, tokenizer, created: str | None = None) -> tuple[PromptSettings, TokenSelection]:
    """How the job's options render ARC prompts and choose the stored tokens (workers and the
    driver's dry render alike); chat templates read the date `created` (the run's, ISO 8601)."""
    settings = PromptSettings(load_template(options.prompt_template), options.grid_encoder,
                              parse_encoder(options.grid_encoder), options.include_answer,
                              datetime.datetime.fromisoformat(created) if created else None)
    selection = TokenSelection(special_token_ids(tokenizer) if options.exclude_special_tokens else frozenset(),
                               parse_positions(options.positions), options.arc_tokens == "test")
    return settings, selection


class TokenizeDoFn(beam.DoFn):
    """Records -> samples; the tokenizer and prompt settings are loaded once per DoFn instance."""

    def __init__(self, options: JobOptions, vocab_size: int, driver: Driver | None = None, created: str | None = None):
        self._driver = driver  # a local job's driver: this worker process dies with it
        self._created = created  # the run's creation date, which chat templates read
        self._options, self._max_seq_len, self._vocab_size = options, options.max_seq_len, vocab_size
        self._markers_as_text = not options.special_tokens_in_text
        self._dropped = Metrics.counter("arc", "train_examples_dropped")
        self._fitted = Metrics.counter("arc", "prompts_fitted_by_dropping")

    def setup(self):
        exit_with_driver(self._driver)
        self._tokenizer = load_tokenizer(resolve_model_dir(self._options.model, weights=False))
        self._settings, self._tokens = prompt_and_selection(self._options, self._tokenizer, self._created)

    def process(self, record):
        results = to_samples(record, self._tokenizer, self._settings, self._max_seq_len, self._tokens,
                             self._markers_as_text, self._vocab_size, self._options.prepend_bos)
        for result in results:
            if isinstance(result, Sample) and result.train_dropped:
                self._dropped.inc(result.train_dropped)
                self._fitted.inc()
        progress.count(self._driver, samples=sum(isinstance(r, Sample) for r in results))
        yield from route(results, "tokenize")


def is_duplicate_task(task_id: str, tasks: Iterable[ArcTask]):
    """The first task with an id (by file, then line) goes on; later ones are dead letters."""
    first, *rest = sorted(tasks, key=lambda t: (t.source, t.line_number))
    yield first
    for task in rest:
        yield duplicate(task, (first.source, first.line_number))


def duplicate(task: ArcTask, first: tuple[str, int]) -> DeadLetter:
    return DeadLetter(task.source, task.line_number, "dedup", "duplicate_task_id",
                      f"task id {task.task_id!r} is first used at {first[0]}:{first[1]}", task.raw, task.task_id)


class FirstUseAcrossWindows(beam.DoFn):
    """Streaming: (task id, task), each id at most once per window -> the task if no earlier window
    used its id, else a dead letter. Where an id was first used is kept in state keyed by the id, so
    the runner holds each id once, with its key, on whichever worker owns the key."""

    FIRST = ReadModifyWriteStateSpec("first", TupleCoder((StrUtf8Coder(), VarIntCoder())))

    def process(self, keyed: tuple[str, ArcTask], first=beam.DoFn.StateParam(FIRST)):
        _, task = keyed
        used = first.read()
        if used is None:
            first.write((task.source, task.line_number))
            yield task  # counted as out of "dedup" already, in its window
        else:
            yield from route([duplicate(task, used)], "dedup")


class DropDuplicateTasks(beam.PTransform):
    """ARC task ids must be unique: duplicates become dead letters (never silently dropped).
    Text documents pass straight through, without a shuffle. In streaming, ids are unique across
    windows too: a task of a later window reusing an id is a dead letter, as within a window."""

    def expand(self, records):
        tasks, docs = records | "SplitKinds" >> beam.Partition(lambda r, _: 0 if isinstance(r, ArcTask) else 1, 2)
        checked = (
            tasks
            | "ByTaskId" >> beam.Map(lambda task: (task.task_id, task))
            | "GroupTaskIds" >> beam.GroupByKey()
            | "FirstOfEachId" >> beam.FlatMapTuple(lambda task_id, group: route(is_duplicate_task(task_id, group),
                                                                               "dedup"))
            .with_outputs(DEAD_LETTER, main="tasks")
        )
        unique, duplicates = checked.tasks, checked[DEAD_LETTER]
        windowing = records.windowing.windowfn
        if not isinstance(windowing, GlobalWindows):
            # State lives per key and window: the check across windows runs in the global window, and
            # its results go back to the windows their tasks came from (by their timestamps).
            across = (
                unique
                | "AllWindows" >> beam.WindowInto(GlobalWindows())
                | "ByTaskIdAcross" >> beam.Map(lambda task: (task.task_id, task))
                | "FirstUseOfId" >> beam.ParDo(FirstUseAcrossWindows()).with_outputs(DEAD_LETTER, main="tasks")
            )
            unique = across.tasks | "BackToWindows" >> beam.WindowInto(windowing)
            duplicates = ((duplicates, across[DEAD_LETTER] | "LateDuplicatesToWindows" >> beam.WindowInto(windowing))
                          | "AllDuplicates" >> beam.Flatten())
        return (unique, docs) | "Rejoin" >> beam.Flatten(), duplicates
