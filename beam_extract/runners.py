"""Runners, by where a job runs: a runner name checked before anything runs, and whether the job
ends with this process (local), runs elsewhere, or has its job server or workers in this process."""

from __future__ import annotations

import difflib
import importlib

from apache_beam.options.pipeline_options import (DirectOptions, FlinkRunnerOptions, PipelineOptions, PortableOptions,
                                                  SparkRunnerOptions, StandardOptions)

from beam_extract.options import UsageError


def canonical_runner(runner: str | None) -> str | None:
    """The runner's name as Beam lists it (`prism`, `PRISMRUNNER`, Beam's class path -> `PrismRunner`),
    so that every decision on it here sees one spelling; another class path as given. Beam itself
    would only fail on an unknown one when the pipeline runs, after the output was claimed: a
    UsageError here."""
    if runner is None:
        return None
    known = {spelling.lower(): path.rsplit(".", 1)[-1] for path in StandardOptions.ALL_KNOWN_RUNNERS
             for spelling in (path, path.rsplit(".", 1)[-1])}
    for spelling in (runner.lower(), f"{runner.lower()}runner"):
        if spelling in known:
            return known[spelling]
    module, _, name = runner.rpartition(".")
    if module:
        try:
            getattr(importlib.import_module(module), name)
            return runner
        except (ImportError, AttributeError, ValueError) as error:
            raise UsageError(f"--runner={runner}: cannot load it ({error})") from None
    close = difflib.get_close_matches(runner, StandardOptions.KNOWN_RUNNER_NAMES, n=1)
    raise UsageError(f"--runner={runner}: no such runner" + (f"; did you mean {close[0]}?" if close else
                     f"; choose from {', '.join(StandardOptions.KNOWN_RUNNER_NAMES)}"))


def spell_runner(options: PipelineOptions) -> None:
    """Sets the job's runner to its canonical name (see canonical_runner)."""
    standard = options.view_as(StandardOptions)
    standard.runner = canonical_runner(standard.runner)


# Beam's runners whose workers are this process's threads or children (None: Beam's default).
IN_PROCESS_RUNNERS = (None, "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner")
# Runners whose job ends with this process (PortableRunner: our own job service and worker pool).
LOCAL_RUNNERS = (*IN_PROCESS_RUNNERS, "PortableRunner", "PrismRunner")


def workers_in_this_process(options: PipelineOptions) -> bool:
    """The job's workers are threads of this process: Beam's in-process runners (unless told to
    start worker processes) or a portable runner's LOOPBACK workers."""
    if options.view_as(PortableOptions).environment_type == "LOOPBACK":
        return True
    return (options.view_as(StandardOptions).runner in IN_PROCESS_RUNNERS
            and options.view_as(DirectOptions).direct_running_mode != "multi_processing")


def is_local(options: PipelineOptions) -> bool:
    """The job runs on this machine and ends with this process: Beam's in-process runners; a
    portable runner whose job service is on loopback (beam_extract.portable_local); Flink's or
    Spark's embedded local cluster (its job server is a child of this process); or any runner
    whose SDK workers run in this process (LOOPBACK). A job server elsewhere (a Flink or Spark
    cluster, a TPU VM's) runs the job on its own: remote."""
    runner = options.view_as(StandardOptions).runner
    if options.view_as(PortableOptions).environment_type == "LOOPBACK":
        return True
    if runner == "FlinkRunner":
        return options.view_as(FlinkRunnerOptions).flink_master in ("[local]", "[auto]")
    if runner == "SparkRunner":
        return options.view_as(SparkRunnerOptions).spark_master_url.startswith("local")
    if runner not in ("PortableRunner", "PrismRunner"):
        return runner in LOCAL_RUNNERS
    endpoint = options.view_as(PortableOptions).job_endpoint or "embed"
    return endpoint == "embed" or endpoint.rpartition(":")[0].strip("[]") in ("localhost", "127.0.0.1", "::1")


def job_server_in_launcher(options: PipelineOptions) -> bool:
    """Beam's FlinkRunner and SparkRunner start their job server as a child of this process (and stop
    it when this process exits) unless given one (--job_endpoint) or told to submit an uber jar to
    the cluster: then the cluster receives the job only while this process lives."""
    if options.view_as(PortableOptions).job_endpoint:
        return False
    runner = options.view_as(StandardOptions).runner
    if runner == "FlinkRunner":
        return not options.view_as(FlinkRunnerOptions).flink_submit_uber_jar
    if runner == "SparkRunner":
        return not options.view_as(SparkRunnerOptions).spark_submit_uber_jar
    return False


# Beam's portable runners watch a job through two gRPC streams, its states and its messages, whose
# deadline is --job_server_timeout (300 s in Beam 2.77): a job that runs longer fails when they expire
# although it runs on (apache/beam#35867; a Prism job of 10^6 samples here). Where Beam starts the job
# server itself, that flag bounds only those streams and two requests to a server already up.
WHOLE_RUN_S = 10 * 365 * 24 * 3600
PORTABLE_RUNNERS = ("PrismRunner", "PortableRunner", "FlinkRunner", "SparkRunner")


def watch_the_whole_run(options: PipelineOptions, argv: list[str]) -> None:
    """A portable job whose job server Beam starts here is watched for as long as it runs, unless
    --job_server_timeout is given. Given a --job_endpoint, Beam's deadline also bounds the wait for
    that server to answer, so it is left as it is."""
    portable = options.view_as(PortableOptions)
    given = any(arg.partition("=")[0] in ("--job_server_timeout", "--job-server-timeout") for arg in argv)
    if options.view_as(StandardOptions).runner in PORTABLE_RUNNERS and not given and not portable.job_endpoint:
        portable.job_server_timeout = WHOLE_RUN_S


def runs_elsewhere(options: PipelineOptions) -> bool:
    """The job goes on without this process, which returns once it is submitted and leaves the lock
    to the job. A job whose job server lives here is waited for like a local one, its lock released
    here: otherwise this process would exit, its job server with it, before the cluster got the job."""
    return not is_local(options) and not job_server_in_launcher(options)
