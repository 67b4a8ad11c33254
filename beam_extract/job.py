"""What the driver resolves before building the graph: the job's options, model config, hooks,
batch plan and fingerprint, and the output it claims (lock, checks, what a resumed run left)."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import importlib
import os
import re
import threading
import uuid
from collections.abc import Callable

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DirectOptions, FlinkRunnerOptions, GoogleCloudOptions,
                                                  PipelineOptions, PortableOptions, SparkRunnerOptions,
                                                  StandardOptions)

from beam_extract import gcs
from beam_extract import resume
from beam_extract.arc.augment import ArcView, augment
from beam_extract.arc.encoders import parse_encoder
from beam_extract.arc.prompt import load_template
from beam_extract.batching import BatchPlan, parse_buckets
from beam_extract.format.commits import RUN_SKIP_SUFFIX
from beam_extract.format.schema import OUTPUT_DTYPES
from beam_extract.format.storage import exists
from beam_extract.hooks import SITES, Hook, hook_name
from beam_extract.io.inventory import inventory
from beam_extract.io.sources import absolute_input
from beam_extract.io.tables import is_table
from beam_extract.legacy import legacy_rewrites
from beam_extract.lifetime import Driver
from beam_extract.model import devices
from beam_extract.model.config import ModelConfig, check_context
from beam_extract.model.hf_config import config_from_hf, load_hf_config
from beam_extract.model.mesh import mesh_sizes
from beam_extract.model.weights import (METADATA_FILES, check_checkpoint, remote_weights_checksum, resolve_model_dir,
                                        weights_checksum)
from beam_extract.options import UsageError, check_ranges, extract_options, parse_layers, parse_sites, sample_input
from beam_extract.records.arc import ArcTask
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.text import TextDoc
from beam_extract.records.tokens import TokenDoc
from beam_extract.sink import ownership
from beam_extract.stages import prompt_and_selection
from beam_extract.tokenize import load_tokenizer, parse_positions, special_affixes, text_token_ids, to_samples


# The stages that dead-letter, in the order of the data path (each writes dead_letter/{stage}-*.jsonl).
DEAD_LETTER_STAGES = ("read", "parse", "dedup", "tokenize", "resume", "extract")


@dataclasses.dataclass(frozen=True)
class Job:
    """What the driver resolves before building the graph."""

    options: dict  # our options only (no Beam/cloud options, which may hold credentials)
    config: ModelConfig
    hooks: tuple[Hook, ...]
    plan: BatchPlan
    streaming: bool = False  # Beam's --streaming: watch --input, output per time window
    run_id: str = ""
    fingerprint: dict = dataclasses.field(default_factory=dict)
    lock: dict = dataclasses.field(default_factory=dict)  # the output's lock as this job holds it
    resumed: resume.Resumed = resume.Resumed()  # with --resume, what the run resumed left
    remote: bool = False  # the runner runs the job elsewhere: the job itself releases the lock
    input_bytes: int | None = None  # of the input files when known and uncompressed (for progress)

    @property
    def output(self) -> str:
        return self.options["output"]

    @property
    def driver(self) -> Driver | None:
        """The local process that runs this job, whose worker processes die with it (None: remote)."""
        return None if self.remote or not self.lock else Driver(self.lock["host"], self.lock["pid"],
                                                               self.lock["pid_start"])


def _files_sha256(directory, names) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                digest.update(f"{name}\x00".encode() + hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


SOFTWARE = ("beam-extract", "jax", "jaxlib", "transformers", "tokenizers")  # whose versions the fingerprint holds


def software_versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in SOFTWARE}


def run_fingerprint(options: dict, config: ModelConfig, hooks: tuple[Hook, ...], device: dict | None,
                    created: str) -> dict:
    """Everything that decides which samples exist and what their activations are: options, model,
    software and device (None: a remote job's, unknown to the driver), and the creation date that
    chat templates read."""
    if options["model"].startswith("gs://"):  # identified by its objects; the workers check and load it
        model_dir = resolve_model_dir(options["model"], weights=False)
        weights = remote_weights_checksum(options["model"])
    else:
        model_dir = resolve_model_dir(options["model"])
        check_checkpoint(config, model_dir)  # its headers, before a worker loads it
        weights = weights_checksum(model_dir)
    return resume.fingerprint(
        options, weights_sha256=weights, config=dataclasses.asdict(config),
        tokenizer_sha256=_files_sha256(model_dir, [n for n in METADATA_FILES if n != "config.json"]),
        hooks=[hook_name(*hook) for hook in hooks],
        template_sha256=hashlib.sha256(load_template(options["prompt_template"]).source.encode()).hexdigest(),
        software=software_versions(), device=device, created=created)


def _usage(check: Callable, *args):
    """A parser of ours that raises ValueError for a bad value: its message becomes a usage error."""
    try:
        return check(*args)
    except ValueError as error:
        raise UsageError(str(error)) from None


ANSWER_SECONDS = 30  # for Cloud Storage's first answer: its client retries an unreachable endpoint for minutes


def _bounded(call: Callable, seconds: float):
    """call(), or TimeoutError after `seconds`; in a daemon thread, so that a call that hangs (no
    network) does not keep the driver from exiting."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except Exception as error:
            outcome.append((False, error))

    thread = threading.Thread(target=target, name="bounded-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer in {seconds} s")
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def _check_gcs(paths: dict[str, str]) -> None:
    """gs:// paths need credentials and an answer from Cloud Storage: checked once in the driver,
    in bounded time, instead of a traceback or a listing retried for minutes."""
    remote = {option: path for option, path in paths.items()  # one without a bucket is refused by `location`
              if path.startswith("gs://") and gcs.split(path)[0]}
    if not remote:
        return
    if not os.environ.get("STORAGE_EMULATOR_HOST"):  # an emulator takes anonymous requests
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError as error:
            raise UsageError(f"{', '.join(remote)} on gs:// need Google Cloud credentials (gcloud auth "
                             f"application-default login, or GOOGLE_APPLICATION_CREDENTIALS): {_one_line(error)}") from None
    option, path = next(iter(remote.items()))
    bucket = gcs.split(path)[0]
    try:  # one small request (absent or present, an answer either way)
        _bounded(lambda: exists(f"gs://{bucket}/.beam-extract-reachable"), ANSWER_SECONDS)
    except TimeoutError as error:
        raise UsageError(f"{option} {path}: Cloud Storage gave {error} (is the network reachable?)") from None
    except Exception as error:
        raise UsageError(f"{option} {path}: {_one_line(error)}") from None


def _input_paths(pattern: str) -> list[str]:
    try:
        paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception as error:  # Beam wraps each file system's errors in its own
        raise UsageError(f"--input {pattern}: {_one_line(error)}") from None
    if not paths:
        raise UsageError(f"--input {pattern}: no file matches")
    directory = next((p for p in paths if "://" not in p and os.path.isdir(p)), None)
    if directory:
        raise UsageError(f"--input {pattern}: {directory} is a directory; name its files, e.g. {directory}/*.jsonl")
    return paths


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:500]


# A file of each kind a run writes into its output, named as runs of ours name them (commits.OUR_NAMES).
OUTPUT_FILES = ("manifest.json", "_run/fingerprint.json", "_run/inputs.json", "_run/lock.json",
                f"_run/.lock.json.{'0' * 32}.tmp", f"_run/{'0' * 12}{RUN_SKIP_SUFFIX}",
                f"_committed/{'0' * 12}-{'0' * 12}.json", "_windows/20260101T000000Z-20260101T001000Z.json",
                "dead_letter/read-00000-of-00001.jsonl", f"{SITES[0]}/layer_00/part-{'0' * 12}-{'0' * 12}.tfrecord")


def check_input_outside_output(pattern: str, output: str) -> None:
    """A glob that would match the job's own files would read them as input (and record them as the
    run's input files, so that no --resume matches again)."""
    matches = re.compile(FileSystem.translate_pattern(pattern)).match  # how every Beam file system matches
    covered = next((name for name in OUTPUT_FILES if matches(f"{output}/{name}")), None)
    if covered:
        raise UsageError(f"--input {pattern} matches the job's own output files ({output}/{covered}); choose an "
                         "--output outside what --input matches, or a narrower --input")


DRY_TASK = ArcTask("dry-run", (((((1, 0), (0, 2)), ((2, 0), (0, 1))),)), ((((0, 1), (1, 0)), ((1, 0), (0, 1))),),
                   "<built-in>", 1)
DRY_TEXT = TextDoc("<built-in>:1", "A short document to check the options with, before any worker starts.",
                   "<built-in>", 1)


def dry_render(options: dict, vocab_size: int, created: str) -> None:
    """Renders a built-in ARC task and text document the way the job will, so a template, encoder,
    length or token selection that would dead-letter every sample fails now, in one line."""
    tokenizer = load_tokenizer(resolve_model_dir(options["model"], weights=False))
    settings, selection = prompt_and_selection(options, tokenizer, created)
    fmt = options["input_format"]
    checks = []
    if fmt in ("text", "auto"):
        checks.append(("a text document", DRY_TEXT, ()))
    if fmt == "tokens":
        if options["prepend_bos"] and not len(special_affixes(tokenizer)[0]):
            raise UsageError(f"--prepend_bos: the tokenizer of --model {options['model']} puts nothing before a text "
                             "(no BOS); leave it off")
        ids = text_token_ids(tokenizer, DRY_TEXT.text, not options["special_tokens_in_text"])
        checks.append(("a row of token ids", TokenDoc(DRY_TEXT.key, tuple(ids.tolist()), DRY_TEXT.source, 1), ()))
    if fmt in ("arc", "auto"):
        # Under `auto` the input may hold no ARC task: only a template or encoder that fails counts
        # (a base model without a chat template still runs text; its ARC tasks are dead letters).
        checks.append(("an ARC task", ArcView(*augment(DRY_TASK, options["seed"], 0)), () if fmt == "arc" else
                       ("too_long", "no_tokens_selected", "no_chat_template")))
    for what, record, tolerated in checks:
        results = to_samples(record, tokenizer, settings, options["max_seq_len"], selection,
                             not options["special_tokens_in_text"], vocab_size, options["prepend_bos"])
        failed = [r for r in results if isinstance(r, DeadLetter) and r.reason not in tolerated]
        if failed and all(isinstance(r, DeadLetter) for r in results):
            raise UsageError(f"these options turn {what} into a dead letter ({failed[0].reason}: "
                             f"{failed[0].detail[:200]}): every sample like it would be; check --model, "
                             "--prompt_template, --grid_encoder, --max_seq_len, --positions and --arc_tokens")


# A tf.train.Example over 2 GiB cannot be parsed back (protobuf's limit); room for the scalar features.
MAX_RECORD_BYTES = 2**31 - 2**24


def compilation_cache_dir(given: str, options: PipelineOptions, remote: bool) -> str:
    """Where workers keep compiled forwards: as given ("none": nowhere), on Dataflow, where every
    worker would otherwise compile every shape anew, under the job's temp location (a prefix per
    JAX version: workers copy the entries at start-up, and another version's are of no use), and
    elsewhere "": each worker's local default (compile_cache.default_directory)."""
    if given == "none":
        return given
    if not given:
        temp = options.view_as(GoogleCloudOptions).temp_location
        if options.view_as(StandardOptions).runner != "DataflowRunner" or not temp:
            return ""
        given = f"{temp.rstrip('/')}/beam-extract-compile-cache/jax-{jax_version()}"
    local = location("--compilation_cache_dir", given)
    if local.startswith("gs://"):
        return local
    if remote:
        raise UsageError(f"--compilation_cache_dir {given!r}: a job that runs elsewhere needs a gs:// directory "
                         "its workers share")
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--compilation_cache_dir {given!r}: cannot create it ({error.strerror})") from None
    if not os.access(local, os.W_OK):
        raise UsageError(f"--compilation_cache_dir {given!r}: not writable")
    return local


def location(option: str, given: str) -> str:
    """gs://bucket/path (without a trailing /), or a local path made absolute with ~ expanded.
    Another scheme, a misspelt gs:// or no bucket is refused: never a local directory named `gs:`."""
    if given.startswith("gs://"):
        if not gcs.split(given)[0]:
            raise UsageError(f"{option} {given!r}: name a bucket, gs://bucket/path (is a variable in it unset?)")
        return given.rstrip("/")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", given):
        raise UsageError(f"{option} {given!r}: use a local directory or gs://bucket/path")
    if not given.strip():
        raise UsageError(f"{option}: name a directory")
    return os.path.abspath(os.path.expanduser(given))


def jax_version() -> str:
    """The installed jaxlib's version, without importing JAX in the driver."""
    from importlib import metadata

    return metadata.version("jaxlib")


def make_job(options: PipelineOptions) -> Job:
    """Resolves and checks everything in the driver, before the graph is built: a mistake is a
    UsageError (or a CheckpointError, UnsupportedConfigError) naming the option, never a failure on
    the workers or a run that dead-letters everything."""
    check_runner(options.view_as(StandardOptions).runner)
    ours = legacy_rewrites(options, extract_options(options))
    check_ranges(ours)
    if ours["resume"] and ours["overwrite"]:
        raise UsageError("--resume continues the run in --output and --overwrite deletes it: choose one")
    streaming = bool(options.view_as(StandardOptions).streaming)
    ours["output"] = location("--output", ours["output"])
    _check_gcs({"--input": ours["input"] or "", "--output": ours["output"], "--model": ours["model"],
                "--compilation_cache_dir": ours["compilation_cache_dir"]})
    ours["input"] = absolute_input(ours["input"] or sample_input())
    check_input_outside_output(ours["input"], ours["output"])
    if not streaming:  # a streaming job may start before its first file lands
        _input_paths(ours["input"])
    _usage(load_template, ours["prompt_template"])
    _usage(parse_encoder, ours["grid_encoder"])
    positions = _usage(parse_positions, ours["positions"])
    if (positions.start or 0) >= 0 and positions.stop is not None and 0 < positions.stop <= ours["norm_exclude_first"]:
        raise UsageError(f"--positions {ours['positions']} stores only positions below --norm_exclude_first "
                         f"{ours['norm_exclude_first']}: the normalisation factors would count no token; lower "
                         "--norm_exclude_first")
    buckets = _usage(parse_buckets, ours["buckets"], ours["max_seq_len"])
    _usage(mesh_sizes, ours["mesh"])
    local = is_local(options)
    ours["compilation_cache_dir"] = compilation_cache_dir(ours["compilation_cache_dir"], options, not local)
    if local:
        devices.start_listing(workers_in_this_process(options))  # counted while the checks below run
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    config = config_from_hf(load_hf_config(resolve_model_dir(ours["model"], weights=False)))
    layers, sites = parse_layers(ours["layers"], config.num_layers), parse_sites(ours["sites"])
    # A token's activations, and its id, position and id in the sequence (varints of up to 10 bytes).
    token_bytes = config.hidden_size * OUTPUT_DTYPES[ours["output_dtype"]].itemsize + 3 * 10
    record_bytes = ours["max_seq_len"] * token_bytes
    if record_bytes > MAX_RECORD_BYTES:  # protobuf cannot read a message over 2 GiB back
        raise UsageError(f"--max_seq_len {ours['max_seq_len']}: a sequence's record would hold up to "
                         f"{record_bytes / 2**30:.1f} GiB ({config.hidden_size} x "
                         f"{ours['output_dtype']} and 3 token ids per token), over the {MAX_RECORD_BYTES / 2**30:.1f} GiB a record "
                         f"can be read back with; use at most {MAX_RECORD_BYTES // token_bytes}")
    _usage(check_context, config, ours["max_seq_len"])
    dry_render(ours, config.vocab_size, created)
    # A local job's workers run on this host: their devices are counted (in a child process, so the
    # driver never holds the accelerator) and a mesh that does not cover them is refused here. A
    # remote job's workers check it against their own.
    device = None
    if local:
        try:
            device = devices.local_devices()
        except devices.DevicesUnavailable as error:
            raise UsageError(f"--mesh {ours['mesh']}: {error}") from None
        _usage(mesh_sizes, ours["mesh"], device["count"])
        device = {"platform": device["platform"], "kind": device["kind"]}
    hooks = tuple((layer, site) for site in sites for layer in layers)
    plan = BatchPlan(buckets, ours["batch_size"], ours["tokens_per_batch"], ours["packing"],
                     min(ours["pack_length"] or ours["max_seq_len"], ours["max_seq_len"]),
                     ours["flush_seconds"] if streaming else 0)
    return Job(ours, config, hooks, plan, streaming, run_id=uuid.uuid4().hex[:12],
               fingerprint=run_fingerprint(ours, config, hooks, device, created), remote=runs_elsewhere(options))


def _check_output(job: Job) -> dict | None:
    """The output's checks (ownership.check_output) and, with --resume, the fingerprint's: reads
    only. Returns the fingerprint the output holds (None: none)."""
    o = job.options
    recorded = ownership.check_output(job.output, o["resume"], set(SITES), o["overwrite"])  # other sites: ours too
    if recorded is not None and not o["overwrite"]:
        resume.refuse_changes(job.output, recorded, job.fingerprint, o["accept_software_change"])
    return recorded


def claim_output(job: Job) -> Job:
    """Takes the output for this job: the check that it is ours (before anything is written), its
    lock, with --resume the same fingerprint and input files, and what the run resumed left (kept
    groups; the rest removed). Nothing is written or deleted before the lock is held and the checks
    pass."""
    output, o = job.output, job.options
    _check_output(job)
    lock = ownership.take_lock(output, job.run_id, "remote" if job.remote else "local", job.remote)
    try:
        recorded = _check_output(job)
        if recorded is not None and o["overwrite"]:
            ownership.remove_our_output(output, SITES, DEAD_LETTER_STAGES)
            recorded = None
        if not job.streaming:  # a streaming job's input is what arrives; its files are not known now
            files = inventory(o["input"])
            ownership.record_inputs(output, files, resumed=recorded is not None)
            if not any(name.endswith(".gz") or is_table(name) for name in files["files"]):  # bytes read = size
                job = dataclasses.replace(job, input_bytes=sum(f["size"] for f in files["files"].values()))
        if recorded is None:
            ownership.record_fingerprint(output, job.fingerprint)
            return dataclasses.replace(job, lock=lock)
        resumed, run = resume.continue_run(output, job.run_id, job.hooks, recorded, job.fingerprint,
                                           DEAD_LETTER_STAGES)
        return dataclasses.replace(job, lock=lock, resumed=resumed, fingerprint=run)
    except BaseException:
        ownership.release_lock(output, lock)
        raise


def check_runner(runner: str | None) -> None:
    """A runner name Beam knows (case-insensitive, `Runner` optional) or a dotted class path; Beam
    itself would only fail when the pipeline runs, after the output was claimed."""
    if runner is None:
        return
    known = {path.rsplit(".", 1)[-1].lower() for path in StandardOptions.ALL_KNOWN_RUNNERS}
    if runner.lower() in known or f"{runner.lower()}runner" in known:
        return
    module, _, name = runner.rpartition(".")
    if module:
        try:
            getattr(importlib.import_module(module), name)
            return
        except (ImportError, AttributeError, ValueError) as error:
            raise UsageError(f"--runner={runner}: cannot load it ({error})") from None
    close = difflib.get_close_matches(runner, StandardOptions.KNOWN_RUNNER_NAMES, n=1)
    raise UsageError(f"--runner={runner}: no such runner" + (f"; did you mean {close[0]}?" if close else
                     f"; choose from {', '.join(StandardOptions.KNOWN_RUNNER_NAMES)}"))


# Runners whose job ends with this process (PortableRunner: our own job service and worker pool).
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner", "PortableRunner",
                 "PrismRunner")


def workers_in_this_process(options: PipelineOptions) -> bool:
    """The job's workers are threads of this process: Beam's in-process runners (unless told to
    start worker processes) or a portable runner's LOOPBACK workers."""
    if options.view_as(PortableOptions).environment_type == "LOOPBACK":
        return True
    return (options.view_as(StandardOptions).runner in (None, "DirectRunner", "direct", "FnApiRunner",
                                                         "BundleBasedDirectRunner")
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


def runs_elsewhere(options: PipelineOptions) -> bool:
    """The job goes on without this process, which returns once it is submitted and leaves the lock
    to the job. A job whose job server lives here is waited for like a local one, its lock released
    here: otherwise this process would exit, its job server with it, before the cluster got the job."""
    return not is_local(options) and not job_server_in_launcher(options)
