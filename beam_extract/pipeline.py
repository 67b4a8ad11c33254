"""The extraction pipeline, wired on one screen:

JSONL files (matched once, or in streaming watched and put into time windows by arrival) -> lines
-> parse -> (ARC: unique ids, augmented views) -> tokenize -> (resume: skip committed)
-> fixed-shape batches -> forward -> TFRecords per hook, committed per batch -> manifest (streaming:
an index per window). Every failure becomes a dead letter with a reason; every input line is
accounted for.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult
from apache_beam.transforms.window import FixedWindows

from beam_extract.arc.encoders import parse_encoder
from beam_extract.arc.prompt import load_template
from beam_extract.batching import BatchPlan, BatchSamples, ShuffleSamples, parse_buckets
from beam_extract.extract import BATCH_STATS, ExtractDoFn
from beam_extract.io.sources import MatchPaths, ReadLines, expand_input
from beam_extract.legacy import legacy_rewrites
from beam_extract.model.config import ModelConfig, config_from_hf, load_hf_config
from beam_extract.model.qwen2 import Hook
from beam_extract.model.weights import resolve_model_dir, weights_checksum
from beam_extract.options import extract_options, parse_layers, parse_sites, sample_input, template_switches
from beam_extract.output.manifest import (CountLineOutcomes, LineBitmaps, SumCounts, SummarizeBatches,
                                          SummarizeCommits, build_manifest, write_manifest)
from beam_extract.output.windows import WriteWindowIndex
from beam_extract.records.dead_letter import DEAD_LETTER
from beam_extract.output.writer import WriteCommitted, WriteDeadLetters, read_commits, remove_uncommitted
from beam_extract.stages import (RESUMED, DropDuplicateTasks, ParseDoFn, SkipCommitted, TokenizeDoFn,
                                 expand_views)
from beam_extract.tokenize import parse_positions


@dataclasses.dataclass(frozen=True)
class Job:
    """What the driver resolves before building the graph."""

    options: dict  # our options only (no Beam/cloud options, which may hold credentials)
    config: ModelConfig
    hooks: tuple[Hook, ...]
    plan: BatchPlan
    streaming: bool = False  # Beam's --streaming: watch --input, output per time window

    @property
    def output(self) -> str:
        return self.options["output"]


def make_job(options: PipelineOptions) -> Job:
    ours = legacy_rewrites(options, extract_options(options))
    streaming = bool(options.view_as(StandardOptions).streaming)
    ours["input"] = expand_input(ours["input"] or sample_input())
    if "://" not in ours["output"]:
        ours["output"] = os.path.abspath(ours["output"])
    ours["output"] = ours["output"].rstrip("/")
    # Fail here, not on the workers.
    load_template(ours["prompt_template"]), parse_encoder(ours["grid_encoder"]), parse_positions(ours["positions"])
    for name in ("views_per_task", "batch_size", "max_seq_len", "shard_size_mb", "poll_interval", "window_seconds",
                 "flush_seconds"):
        if ours[name] < 1:
            raise ValueError(f"--{name} must be at least 1")
    if read_commits(ours["output"]) and not ours["resume"]:
        raise ValueError(f"{ours['output']} holds results of an earlier run: pass --resume to continue it, "
                         "or choose another --output")
    config = config_from_hf(load_hf_config(resolve_model_dir(ours["model"], weights=False)))
    layers, sites = parse_layers(ours["layers"], config.num_layers), parse_sites(ours["sites"])
    plan = BatchPlan(parse_buckets(ours["buckets"], ours["max_seq_len"]), ours["batch_size"],
                     ours["tokens_per_batch"], ours["packing"],
                     min(ours["pack_length"] or ours["max_seq_len"], ours["max_seq_len"]),
                     ours["flush_seconds"] if streaming else 0)
    return Job(ours, config, tuple((layer, site) for site in sites for layer in layers), plan, streaming)


def _finish(_, job: Job, lines_read: int, lines: dict, samples: int, resumed: int, dead_letters: dict,
            batching: dict, commits: int, dead_letter_files: list) -> str:
    """Runs once every write has finished (its side inputs depend on all of them; `commits`, this
    run's count, is there for that). The manifest lists the commits on disk: this run's and those of
    any run it resumed."""
    every_commit = read_commits(job.output)
    remove_uncommitted(job.output, job.hooks, every_commit)
    manifest = build_manifest(
        options=job.options, config=job.config, hooks=job.hooks, commits=every_commit, lines_read=lines_read,
        lines=lines, samples=samples, resumed=resumed, dead_letters=dead_letters, batching=batching,
        dead_letter_files=dead_letter_files, weights_sha256=weights_checksum(resolve_model_dir(job.options["model"])),
    )
    return write_manifest(job.output, manifest)


def total(pcoll: beam.PCollection, label: str, combine: beam.CombineFn, streaming: bool) -> beam.PCollection:
    """The whole run's result in batch (the combine's empty result if there was no input), each
    window's in streaming (none for a window without input)."""
    combined = beam.CombineGlobally(combine)
    return pcoll | label >> (combined.without_defaults() if streaming else combined)


def read_input(pipeline: beam.Pipeline, job: Job) -> beam.PCollection:
    """Paths of the input files: matched once, or in streaming watched for new ones."""
    o = job.options
    return pipeline | "MatchInput" >> MatchPaths(o["input"], o["poll_interval"] if job.streaming else 0)


def build(paths: beam.PCollection, job: Job) -> None:
    """Every stage after the source, for batch and streaming alike: `paths` is a PCollection of input
    file paths (from read_input, or a TestStream). In streaming they are timestamped by arrival and
    go into fixed windows; everything derived from a line stays in its window."""
    o = job.options
    if job.streaming:
        paths = paths | "Window" >> beam.WindowInto(FixedWindows(o["window_seconds"]))
    lines_read = paths | "ReadLines" >> ReadLines()
    parsed = lines_read | "Parse" >> beam.ParDo(ParseDoFn(o["input_format"], o["text_field"])).with_outputs(
        DEAD_LETTER, main="records")
    records, duplicates = parsed.records | "UniqueTaskIds" >> DropDuplicateTasks()
    tokenized = (
        records
        | "Augment" >> beam.FlatMap(expand_views, o["seed"], o["views_per_task"])
        | "Tokenize" >> beam.ParDo(TokenizeDoFn(o)).with_outputs(DEAD_LETTER, main="samples")
    )
    samples = tokenized.samples | "SkipCommitted" >> beam.ParDo(SkipCommitted(o["output"])).with_outputs(
        RESUMED, main="todo")
    todo = samples.todo | "Shuffle" >> ShuffleSamples(o["seed"]) if o["shuffle"] else samples.todo
    extracted = (
        todo
        | "Batch" >> BatchSamples(job.plan)
        | "Extract" >> beam.ParDo(ExtractDoFn(o["model"], o["dtype"], o["mesh"], job.hooks, o["output_dtype"]))
        .with_outputs(DEAD_LETTER, BATCH_STATS, main="records")
    )
    commits = extracted.records | "Write" >> beam.ParDo(WriteCommitted(
        o["output"], job.hooks, o["shard_size_mb"] << 20, o["seed"] if o["shuffle"] else None))
    # Dead letters and the accounting of lines are handled per stage; only small results (file
    # names, counts, per-file bitmaps) are flattened, so no runner gathers every dead letter.
    dead_by_stage = {"parse": parsed[DEAD_LETTER], "dedup": duplicates, "tokenize": tokenized[DEAD_LETTER],
                     "extract": extracted[DEAD_LETTER]}
    dead_letter_files, reasons, line_bitmaps = [], [], []
    for stage, letters in dead_by_stage.items():
        dead_letter_files.append(letters | f"WriteDeadLetters[{stage}]" >> WriteDeadLetters(o["output"], stage))
        reasons.append(letters | f"Reasons[{stage}]" >> beam.Map(lambda d: d.reason)
                       | f"CountReasons[{stage}]" >> beam.combiners.Count.PerElement())
        line_bitmaps.append(letters | f"LinesDead[{stage}]" >> beam.Map(lambda d: (d.source, (d.line_number, False)))
                            | f"BitmapsDead[{stage}]" >> beam.CombinePerKey(LineBitmaps()))
    # Every line read either produced samples (now or in the run being resumed) or was dead-lettered.
    line_bitmaps += [
        extracted.records
        | "LinesWithSample" >> beam.FlatMap(lambda rs: [(r.source, (r.line_number, True)) for r in rs
                                                        if r.hook_index == 0])
        | "BitmapsWritten" >> beam.CombinePerKey(LineBitmaps()),
        samples[RESUMED]
        | "LinesResumed" >> beam.Map(lambda s: (s.source, (s.line_number, True)))
        | "BitmapsResumed" >> beam.CombinePerKey(LineBitmaps()),
    ]
    lines = (
        line_bitmaps
        | "AllBitmaps" >> beam.Flatten()
        | "PerFile" >> beam.CombinePerKey(CountLineOutcomes())
        | "FileCounts" >> beam.FlatMap(lambda file_counts: file_counts[1].items())
    )

    count = beam.combiners.CountCombineFn
    totals = {
        "lines_read": total(lines_read, "CountLines", count(), job.streaming),
        "lines": total(lines, "AllFiles", SumCounts(), job.streaming),
        "samples": total(samples.todo, "CountSamples", count(), job.streaming),
        "resumed": total(samples[RESUMED], "CountResumed", count(), job.streaming),
        "dead_letters": total(reasons | "AllReasons" >> beam.Flatten(), "SumReasons", SumCounts(), job.streaming),
        "batching": total(extracted[BATCH_STATS], "SummarizeBatches", SummarizeBatches(), job.streaming),
        # A window's index lists its commits; the batch manifest reads them from disk instead.
        "commits": total(commits, "SummarizeCommits", SummarizeCommits(job.hooks) if job.streaming else count(),
                         job.streaming),
        "dead_letter_files": total(dead_letter_files | "AllDeadLetterFiles" >> beam.Flatten(), "DeadLetterFiles",
                                   beam.combiners.ToListCombineFn(), job.streaming),
    }
    if job.streaming:
        # An unbounded job never finishes, so global side inputs never become ready: each window's
        # totals meet in a CoGroupByKey when the window closes and go to its index.
        (
            {name: pcoll | f"Key[{name}]" >> beam.Map(lambda value: (None, value)) for name, pcoll in totals.items()}
            | "PerWindow" >> beam.CoGroupByKey()
            | "WindowIndex" >> beam.ParDo(WriteWindowIndex(job.output, job.hooks))
        )
    else:
        (
            paths.pipeline
            | "Once" >> beam.Create([None])
            | "Manifest" >> beam.Map(_finish, job, **{name: beam.pvalue.AsSingleton(pcoll)
                                                     for name, pcoll in totals.items()})
        )


def remove_leftovers_before_streaming(job: Job) -> None:
    """A batch job removes a killed run's leftovers (files no commit lists) when it ends; a streaming
    job never ends, so a resumed one removes them before it starts."""
    if job.streaming and job.options["resume"]:
        remove_uncommitted(job.output, job.hooks, read_commits(job.output))


def _local_runner_without_download(options: PipelineOptions) -> None:
    """Beam 2.77's DirectRunner first tries to download the Prism runner, then falls back to the
    in-process FnApiRunner. We go to the FnApiRunner directly: no network, same semantics, and it
    honours --direct_num_workers and --direct_running_mode."""
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "direct") and not standard.streaming:
        standard.runner = "FnApiRunner"


# Runners whose job ends with this process (PortableRunner: our own job service and worker pool).
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner", "PortableRunner")


def _refuse_local_streaming(options: PipelineOptions) -> None:
    """Beam 2.77's local runners cannot watch files: the BundleBasedDirectRunner rejects
    MatchContinuously, the FnApiRunner polls but emits nothing past a GroupByKey until its source
    ends (never), and the DirectRunner would first try to download Prism."""
    standard = options.view_as(StandardOptions)
    if standard.streaming and standard.runner in LOCAL_RUNNERS and standard.runner != "PortableRunner":
        raise ValueError("--streaming runs on Dataflow or a portable runner (Flink, Spark); Beam's local runners "
                         "cannot watch --input for new files. Without --streaming the job reads the files there now.")


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> tuple[PipelineResult, Job]:
    """Builds and runs the job. Local and portable runs are waited for; a Dataflow job (or a Flex
    Template launch) returns once submitted."""
    options = PipelineOptions(template_switches(sys.argv[1:] if argv is None else argv))
    _refuse_local_streaming(options)
    job = make_job(options)
    remove_leftovers_before_streaming(job)
    _local_runner_without_download(options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build(read_input(pipeline, job), job)
    result = pipeline.run()
    if test_pipeline is not None or is_local(options):
        result.wait_until_finish()
    return result, job


def is_local(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in LOCAL_RUNNERS
