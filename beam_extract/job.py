"""What the driver resolves before building the graph: the job's options, model config, hooks,
batch plan and fingerprint, and the output it claims (lock, checks, what a resumed run left)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from collections.abc import Callable

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (FlinkRunnerOptions, GoogleCloudOptions, PipelineOptions, PortableOptions,
                                                  SparkRunnerOptions, StandardOptions)

from beam_extract.arc.augment import ArcView, augment
from beam_extract.arc.encoders import parse_encoder
from beam_extract.arc.prompt import load_template
from beam_extract.batching import BatchPlan, parse_buckets
from beam_extract.hooks import SITES, Hook, hook_name
from beam_extract.io.inventory import inventory
from beam_extract.io.sources import absolute_input
from beam_extract.legacy import legacy_rewrites
from beam_extract.lifetime import Driver
from beam_extract.model.config import ModelConfig, check_context, config_from_hf, load_hf_config
from beam_extract.model.weights import (METADATA_FILES, check_checkpoint, remote_weights_checksum, resolve_model_dir,
                                        weights_checksum)
from beam_extract.model.mesh import mesh_sizes
from beam_extract.options import UsageError, check_ranges, extract_options, parse_layers, parse_sites, sample_input
from beam_extract.output import ownership
from beam_extract.output.commits import (RUN_SKIP_SUFFIX, delete_quietly, list_paths, read_groups_on_disk,
                                         select_groups, without_samples, write_sample_ids)
from beam_extract.output.schema import OUTPUT_DTYPES
from beam_extract.output.writer import remove_unlisted
from beam_extract.records.arc import ArcTask
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.text import TextDoc
from beam_extract.stages import prompt_and_selection
from beam_extract.tokenize import load_tokenizer, parse_positions, to_samples


# The stages that dead-letter, in the order of the data path (each writes dead_letter/{stage}-*.jsonl).
DEAD_LETTER_STAGES = ("read", "parse", "dedup", "tokenize", "resume", "extract")


@dataclasses.dataclass(frozen=True)
class Resumed:
    """What a --resume run continues: the groups of the earlier run it keeps (without their sample
    ids) and the file of those ids and digests, which workers skip."""

    groups: tuple[dict, ...] = ()
    skip_path: str | None = None


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
    resumed: Resumed = Resumed()
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


def run_fingerprint(options: dict, config: ModelConfig, hooks: tuple[Hook, ...]) -> dict:
    """Everything that decides which samples exist and what their activations are."""
    if options["model"].startswith("gs://"):  # identified by its objects; the workers check and load it
        model_dir = resolve_model_dir(options["model"], weights=False)
        weights = remote_weights_checksum(options["model"])
    else:
        model_dir = resolve_model_dir(options["model"])
        check_checkpoint(config, model_dir)  # its headers, before a worker loads it
        weights = weights_checksum(model_dir)
    return ownership.fingerprint(
        options, weights_sha256=weights, config=dataclasses.asdict(config),
        tokenizer_sha256=_files_sha256(model_dir, [n for n in METADATA_FILES if n != "config.json"]),
        hooks=[hook_name(*hook) for hook in hooks],
        template_sha256=hashlib.sha256(load_template(options["prompt_template"]).source.encode()).hexdigest())


def _usage(check: Callable, *args):
    """A parser of ours that raises ValueError for a bad value: its message becomes a usage error."""
    try:
        return check(*args)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _input_paths(pattern: str) -> list[str]:
    try:
        paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception as error:  # Beam wraps each file system's errors in its own
        raise UsageError(f"--input {pattern}: {error}") from None
    if not paths:
        raise UsageError(f"--input {pattern}: no file matches")
    return paths


DRY_TASK = ArcTask("dry-run", (((((1, 0), (0, 2)), ((2, 0), (0, 1))),)), ((((0, 1), (1, 0)), ((1, 0), (0, 1))),),
                   "<built-in>", 1)
DRY_TEXT = TextDoc("<built-in>:1", "A short document to check the options with, before any worker starts.",
                   "<built-in>", 1)


def dry_render(options: dict, vocab_size: int) -> None:
    """Renders a built-in ARC task and text document the way the job will, so a template, encoder,
    length or token selection that would dead-letter every sample fails now, in one line."""
    tokenizer = load_tokenizer(resolve_model_dir(options["model"], weights=False))
    settings, selection = prompt_and_selection(options, tokenizer)
    fmt = options["input_format"]
    checks = []
    if fmt in ("text", "auto"):
        checks.append(("a text document", DRY_TEXT, ()))
    if fmt in ("arc", "auto"):
        # Under `auto` the input may hold no ARC task: only a template or encoder that fails counts
        # (a base model without a chat template still runs text; its ARC tasks are dead letters).
        checks.append(("an ARC task", ArcView(*augment(DRY_TASK, options["seed"], 0)), () if fmt == "arc" else
                       ("too_long", "no_tokens_selected", "no_chat_template")))
    for what, record, tolerated in checks:
        results = to_samples(record, tokenizer, settings, options["max_seq_len"], selection,
                             not options["special_tokens_in_text"], vocab_size)
        failed = [r for r in results if isinstance(r, DeadLetter) and r.reason not in tolerated]
        if failed and all(isinstance(r, DeadLetter) for r in results):
            raise UsageError(f"these options turn {what} into a dead letter ({failed[0].reason}: "
                             f"{failed[0].detail[:200]}): every sample like it would be; check --model, "
                             "--prompt_template, --grid_encoder, --max_seq_len, --positions and --arc_tokens")


# A tf.train.Example over 2 GiB cannot be parsed back (protobuf's limit); room for the scalar features.
MAX_RECORD_BYTES = 2**31 - 2**24


def compilation_cache_dir(given: str, options: PipelineOptions, remote: bool) -> str:
    """Where workers keep compiled forwards: as given, or on Dataflow, where every worker would
    otherwise compile every shape anew, under the job's temp location. A prefix per JAX version:
    workers copy the entries at start-up, and another version's are of no use."""
    if not given:
        temp = options.view_as(GoogleCloudOptions).temp_location
        if options.view_as(StandardOptions).runner != "DataflowRunner" or not temp:
            return ""
        given = f"{temp.rstrip('/')}/beam-extract-compile-cache/jax-{jax_version()}"
    if given.startswith("gs://"):
        if not given.removeprefix("gs://").strip("/"):
            raise UsageError(f"--compilation_cache_dir {given!r}: name a bucket, gs://bucket/path")
        return given.rstrip("/")
    if "://" in given:
        raise UsageError(f"--compilation_cache_dir {given!r}: use a local directory or gs://bucket/path")
    if remote:
        raise UsageError(f"--compilation_cache_dir {given!r}: a job that runs elsewhere needs a gs:// directory "
                         "its workers share")
    local = os.path.abspath(os.path.expanduser(given))
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--compilation_cache_dir {given!r}: cannot create it ({error.strerror})") from None
    if not os.access(local, os.W_OK):
        raise UsageError(f"--compilation_cache_dir {given!r}: not writable")
    return local


def jax_version() -> str:
    """The installed jaxlib's version, without importing JAX in the driver."""
    from importlib import metadata

    return metadata.version("jaxlib")


def make_job(options: PipelineOptions) -> Job:
    """Resolves and checks everything in the driver, before the graph is built: a mistake is a
    UsageError (or a CheckpointError, UnsupportedConfigError) naming the option, never a failure on
    the workers or a run that dead-letters everything."""
    ours = legacy_rewrites(options, extract_options(options))
    check_ranges(ours)
    if ours["resume"] and ours["overwrite"]:
        raise UsageError("--resume continues the run in --output and --overwrite deletes it: choose one")
    streaming = bool(options.view_as(StandardOptions).streaming)
    ours["input"] = absolute_input(ours["input"] or sample_input())
    if "://" not in ours["output"]:
        ours["output"] = os.path.abspath(ours["output"])
    ours["output"] = ours["output"].rstrip("/")
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
    # Syntax and arithmetic only: counting devices here would start JAX in the driver (on a GPU it
    # would take the memory the workers need); the workers check the size against their devices.
    _usage(mesh_sizes, ours["mesh"])
    ours["compilation_cache_dir"] = compilation_cache_dir(ours["compilation_cache_dir"], options, not is_local(options))
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
    dry_render(ours, config.vocab_size)
    hooks = tuple((layer, site) for site in sites for layer in layers)
    plan = BatchPlan(buckets, ours["batch_size"], ours["tokens_per_batch"], ours["packing"],
                     min(ours["pack_length"] or ours["max_seq_len"], ours["max_seq_len"]),
                     ours["flush_seconds"] if streaming else 0)
    return Job(ours, config, hooks, plan, streaming, run_id=uuid.uuid4().hex[:12],
               fingerprint=run_fingerprint(ours, config, hooks), remote=not is_local(options))


def claim_output(job: Job) -> Job:
    """Takes the output for this job: the check that it is ours (before anything is written), its
    lock, with --resume the same fingerprint and input files, and what the run resumed left (kept
    groups; the rest removed). Nothing is written or deleted before the lock is held and the checks
    pass."""
    output, sites, o = job.output, set(SITES), job.options  # a run of ours with other sites is ours too
    ownership.check_output(output, job.fingerprint, o["resume"], sites, o["overwrite"])
    lock = ownership.take_lock(output, job.run_id, "remote" if job.remote else "local", job.remote)
    try:
        recorded = ownership.check_output(output, job.fingerprint, o["resume"], sites, o["overwrite"])
        if recorded is not None and o["overwrite"]:
            ownership.remove_our_output(output, SITES, DEAD_LETTER_STAGES)
            recorded = None
        if not job.streaming:  # a streaming job's input is what arrives; its files are not known now
            files = inventory(o["input"])
            ownership.record_inputs(output, files, resumed=recorded is not None)
            if not any(name.endswith(".gz") for name in files["files"]):
                job = dataclasses.replace(job, input_bytes=sum(f["size"] for f in files["files"].values()))
        if recorded is None:
            ownership.record_fingerprint(output, job.fingerprint)
            return dataclasses.replace(job, lock=lock)
        kept, _ = select_groups(read_groups_on_disk(output))
        remove_unlisted(output, job.hooks, kept)
        ownership.remove_dead_letters(output, DEAD_LETTER_STAGES)  # every line is read, and dead-lettered, again
        delete_quietly(list_paths(f"{output}/{ownership.RUN_DIR}/*{RUN_SKIP_SUFFIX}"))  # of killed resumptions
        skip_path = f"{output}/{ownership.RUN_DIR}/{job.run_id}{RUN_SKIP_SUFFIX}"
        write_sample_ids(skip_path, (pair for g in kept for pair in zip(g["samples"], g["digests"])))
        resumed = Resumed(tuple(without_samples(g) for g in kept), skip_path)
        return dataclasses.replace(job, lock=lock, resumed=resumed)
    except BaseException:
        ownership.release_lock(output, lock)
        raise


# Runners whose job ends with this process (PortableRunner: our own job service and worker pool).
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner", "PortableRunner",
                 "PrismRunner")


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
