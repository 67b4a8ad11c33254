"""The extraction pipeline, wired on one screen:

JSONL, Parquet and Arrow files (matched once, or in streaming watched and put into time windows by
arrival) -> lines and rows (Parquet by row group) -> parse -> (ARC: unique ids, augmented views)
-> tokenize -> (resume: skip committed) -> fixed-shape batches -> forward -> TFRecords per hook in shard groups, each committed when closed
-> manifest (streaming: an index per window), from the groups the pipeline accepted. Every failure
becomes a dead letter with a reason; every input line is accounted for. The driver's side (options,
fingerprint, claiming the output) is in `job`; what a --resume continues, and the skip, in `resume`.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import threading
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import (PipelineOptions, PortableOptions, PrismRunnerOptions,
                                                  StandardOptions)
from apache_beam.runners.runner import PipelineResult
from apache_beam.transforms.window import FixedWindows

from beam_extract.accounting.invariants import RunTotals, problems
from beam_extract.accounting.lines import AccountLines
from beam_extract.accounting.totals import TotalRun, committed_ids
from beam_extract.batching import BatchSamples, ShuffleSamples
from beam_extract.extract import BATCH_STATS, ExtractDoFn
from beam_extract.faults import maybe_fail
from beam_extract.io.sources import MatchPaths
from beam_extract.io.tables import ReadInput, columns_for
from beam_extract.job import DEAD_LETTER_STAGES, Job, claim_output, make_job
from beam_extract.options import UsageError, check_arguments, template_switches
from beam_extract.progress import Reporter
from beam_extract.records.dead_letter import DEAD_LETTER
from beam_extract.records.identity import input_root
from beam_extract.resume import RESUMED, SkipCommitted, remove_skip_file
from beam_extract.runners import LOCAL_RUNNERS, spell_runner, watch_the_whole_run
from beam_extract.sink import ownership
from beam_extract.sink.extracted import ExtractedBatch
from beam_extract.sink.manifest import build_manifest, write_manifest
from beam_extract.sink.windows import WriteWindowIndex
from beam_extract.sink.writer import WriteShards, remove_unlisted
from beam_extract.stages import DropDuplicateTasks, ParseDoFn, TokenizeDoFn, expand_views


def _finish(totals: RunTotals, job: Job) -> str:
    """Runs once every write has finished (its totals depend on all of them). The output is what the
    pipeline accepted: the groups it passed on (successful attempts only) and those the resumed run
    kept; anything else of ours on disk is removed."""
    every_group = [*job.resumed.groups, *totals.groups]
    remove_unlisted(job.output, job.hooks, every_group)
    maybe_fail("finalize")
    manifest = build_manifest(options=job.options, config=job.config, hooks=job.hooks, groups=every_group,
                              totals=totals, weights_sha256=job.fingerprint["weights_sha256"], run_id=job.run_id)
    # The software and device of this job; a resumption's differences from the run's, as accepted.
    manifest["software"] = {**job.fingerprint["software"], "device": job.fingerprint["device"],
                            "accepted_changes": list(job.resumed.software_changes)}
    manifest["problems"] = problems(manifest["counts"], totals.dead_letters)
    manifest["ok"] = not manifest["problems"]
    path = write_manifest(job.output, manifest)
    remove_skip_file(job.resumed)
    if job.remote:
        ownership.release_lock(job.output, job.lock)
        if not manifest["ok"]:  # marks the remote job failed; a local run's exit code says it
            raise RuntimeError(f"beam-extract: the run's invariants do not hold: {'; '.join(manifest['problems'])}")
    return path


def read_input(pipeline: beam.Pipeline, job: Job) -> beam.PCollection:
    """Paths of the input files: matched once, or in streaming watched for new ones."""
    o = job.options
    return pipeline | "MatchInput" >> MatchPaths(o.input, o.poll_interval if job.streaming else 0)


def build(paths: beam.PCollection, job: Job) -> None:
    """Every stage after the source, for batch and streaming alike: `paths` is a PCollection of input
    file paths (from read_input, or a TestStream). In streaming they are timestamped by arrival and
    go into fixed windows; everything derived from a line stays in its window."""
    o = job.options
    if job.streaming:
        paths = paths | "Window" >> beam.WindowInto(FixedWindows(o.window_seconds))
    read = paths | "ReadInput" >> ReadInput(columns_for(o), o.max_line_bytes, o.max_expansion)
    parsed = read["lines"] | "Parse" >> beam.ParDo(ParseDoFn(o, input_root(o.input), job.driver)).with_outputs(
        DEAD_LETTER, main="records")
    records, duplicates = parsed.records | "UniqueTaskIds" >> DropDuplicateTasks()
    tokenized = (
        records
        | "Augment" >> beam.FlatMap(expand_views, o.seed, o.views_per_task)
        | "Tokenize" >> beam.ParDo(TokenizeDoFn(o, job.config.vocab_size, job.driver,
                                                job.fingerprint["created"])).with_outputs(
            DEAD_LETTER, main="samples")
    )
    samples = tokenized.samples | "SkipCommitted" >> SkipCommitted(job.resumed.skip_path, job.streaming)
    # A shuffle before batching ends the stage that reads, parses and tokenizes: Beam's in-process
    # runner gives a stage with state (batching) to one worker whole, and would tokenize there too.
    spread = "Shuffle" >> ShuffleSamples(o.seed) if o.shuffle else "SpreadSamples" >> beam.Reshuffle()
    todo = samples.todo | spread
    extracted = (
        todo
        | "Batch" >> BatchSamples(job.plan)
        | "Extract" >> beam.ParDo(ExtractDoFn(o.model, o.dtype, o.mesh, job.hooks, o.output_dtype,
                                              job.driver, o.compilation_cache_dir))
        .with_output_types(ExtractedBatch).with_outputs(DEAD_LETTER, BATCH_STATS, main="records")
    )
    groups = extracted.records | "Write" >> beam.ParDo(WriteShards(
        o.output, job.hooks, o.shard_size_mb << 20, o.seed if o.shuffle else None,
        job.driver, o.norm_exclude_first))
    dead_by_stage = {"read": read[DEAD_LETTER], "parse": parsed[DEAD_LETTER], "dedup": duplicates,
                     "tokenize": tokenized[DEAD_LETTER], "resume": samples[DEAD_LETTER],
                     "extract": extracted[DEAD_LETTER]}
    assert tuple(dead_by_stage) == DEAD_LETTER_STAGES
    dead_letter_files, reasons, lines = dead_by_stage | "AccountLines" >> AccountLines(
        o.output, extracted.records, samples[RESUMED])

    totals = {
        "lines_read": read["lines"], "lines": lines, "samples": samples.todo, "resumed": samples[RESUMED],
        "dead_letters": reasons, "batching": extracted[BATCH_STATS], "dead_letter_files": dead_letter_files,
        "committed_ids": committed_ids(groups, None if job.streaming else job.resumed.skip_path), "groups": groups,
    } | "Totals" >> TotalRun(job.streaming)
    if job.streaming:
        totals | "WindowIndex" >> beam.ParDo(WriteWindowIndex(job.output, job.hooks, job.config,
                                                                o.norm_exclude_first))
    else:
        totals | "Manifest" >> beam.Map(_finish, job)


def _local_runner_without_download(options: PipelineOptions) -> None:
    """Beam 2.77's DirectRunner first tries to download the Prism runner, then falls back to the
    in-process FnApiRunner. We go to the FnApiRunner directly: no network, same semantics, and it
    honours --direct_num_workers and --direct_running_mode. --runner=PrismRunner runs on the prism
    binary installed beside this Python (`make prism`, from the Go module proxy), never one that
    Beam would download."""
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner") and not standard.streaming:
        standard.runner = "FnApiRunner"
    prism = options.view_as(PrismRunnerOptions)
    if standard.runner == "PrismRunner" and not prism.prism_location \
            and not options.view_as(PortableOptions).job_endpoint:
        installed = Path(sys.executable).parent / "prism"
        found = str(installed) if installed.is_file() else shutil.which("prism")
        if not found:
            raise UsageError("--runner=PrismRunner: no prism binary beside this Python or on PATH; install it "
                             "with `make prism` (go install github.com/apache/beam/sdks/v2/go/cmd/prism@v2.77.0) "
                             "or pass --prism_location")
        prism.prism_location = found


def _refuse_local_streaming(options: PipelineOptions) -> None:
    """Beam 2.77's in-process runners cannot watch files: the BundleBasedDirectRunner rejects
    MatchContinuously, the FnApiRunner polls but emits nothing past a GroupByKey until its source
    ends (never), and the DirectRunner would first try to download Prism. Prism can."""
    standard = options.view_as(StandardOptions)
    if standard.streaming and standard.runner in LOCAL_RUNNERS and standard.runner not in ("PortableRunner",
                                                                                         "PrismRunner"):
        raise UsageError(f"--streaming with --runner={standard.runner or 'DirectRunner'}: Beam's in-process runners "
                         "cannot watch --input for new files; run it locally with --runner=PrismRunner (`make "
                         "prism`), or on Dataflow, Flink or Spark. Without --streaming the job reads the files "
                         "there now.")


def _quiet_if_stream_closed(args: threading.ExceptHookArgs) -> None:
    """Once a local job is stopped, its SDK worker's threads see their streams to the runner close:
    that is the stop, not an error to print."""
    import grpc

    if not isinstance(args.exc_value, grpc.RpcError):
        threading.__excepthook__(args)


def _wait_cancelling_on_interrupt(result: PipelineResult) -> None:
    """Waits for a local job; Ctrl-C cancels it through its runner first, so its SDK worker stops
    cleanly, instead of Beam's own handler stopping a portable runner's job server under it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result.wait_until_finish()
    except KeyboardInterrupt:
        threading.excepthook = _quiet_if_stream_closed
        with contextlib.suppress(Exception):  # the in-process runners cannot cancel; they stop with us
            result.cancel()  # not waited for: Prism may not end a watch promptly; it stops with us
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> tuple[PipelineResult, Job]:
    """Builds and runs the job. Local and portable runs are waited for; a Dataflow job (or a Flex
    Template launch) returns once submitted."""
    argv = template_switches(sys.argv[1:] if argv is None else argv)
    check_arguments(argv)
    options = PipelineOptions(argv)
    spell_runner(options)
    _refuse_local_streaming(options)
    _local_runner_without_download(options)
    watch_the_whole_run(options, argv)
    job = claim_output(make_job(options))
    waits = test_pipeline is not None or not job.remote
    try:
        pipeline = test_pipeline or beam.Pipeline(options=options)
        build(read_input(pipeline, job), job)
        # A local job reports its progress every few seconds (the in-process runner returns only
        # once the job is done); a remote job's progress is in its runner's metrics.
        with Reporter(job.driver, job.input_bytes) if job.driver else contextlib.nullcontext():
            result = pipeline.run()
            if waits:
                _wait_cancelling_on_interrupt(result)
    except BaseException:
        ownership.release_lock(job.output, job.lock)
        raise
    if waits:  # a remote job releases the lock itself when it ends
        ownership.release_lock(job.output, job.lock)
    return result, job
