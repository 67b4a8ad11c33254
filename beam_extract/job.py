"""What the driver resolves before building the graph: the job's options, model config, hooks,
batch plan and fingerprint, and the output it claims (lock, checks, what a resumed run left). The
checks of single options are in `checks` and `locations`; which runner runs where in `runners`."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import uuid

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_extract import resume
from beam_extract.arc.encoders import parse_encoder
from beam_extract.arc.prompt import load_template
from beam_extract.batching import BatchPlan, parse_buckets
from beam_extract.checks import check_positions, check_record_size, dry_render, usage
from beam_extract.hooks import SITES, Hook, hook_name
from beam_extract.io.inventory import inventory
from beam_extract.io.sources import absolute_input
from beam_extract.io.tables import is_table
from beam_extract.legacy import legacy_rewrites
from beam_extract.lifetime import Driver
from beam_extract.locations import check_gcs, check_input_outside_output, compilation_cache_dir, input_paths, location
from beam_extract.model import devices
from beam_extract.model.config import ModelConfig, check_context
from beam_extract.model.hf_config import config_from_hf, load_hf_config
from beam_extract.model.mesh import mesh_sizes
from beam_extract.model.weights import (METADATA_FILES, check_checkpoint, remote_weights_checksum, resolve_model_dir,
                                        weights_checksum)
from beam_extract.options import (JobOptions, UsageError, check_ranges, extract_options, parse_layers, parse_sites,
                                  sample_input)
from beam_extract.runners import is_local, runs_elsewhere, spell_runner, workers_in_this_process
from beam_extract.sink import ownership


# The stages that dead-letter, in the order of the data path (each writes dead_letter/{stage}-*.jsonl).
DEAD_LETTER_STAGES = ("read", "parse", "dedup", "tokenize", "resume", "extract")


@dataclasses.dataclass(frozen=True)
class Job:
    """What the driver resolves before building the graph."""

    options: JobOptions  # our options only (no Beam/cloud options, which may hold credentials)
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
        return self.options.output

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


def run_fingerprint(options: JobOptions, config: ModelConfig, hooks: tuple[Hook, ...], device: dict | None,
                    created: str) -> dict:
    """Everything that decides which samples exist and what their activations are: options, model,
    software and device (None: a remote job's, unknown to the driver), and the creation date that
    chat templates read."""
    if options.model.startswith("gs://"):  # identified by its objects; the workers check and load it
        model_dir = resolve_model_dir(options.model, weights=False)
        weights = remote_weights_checksum(options.model)
    else:
        model_dir = resolve_model_dir(options.model)
        check_checkpoint(config, model_dir)  # its headers, before a worker loads it
        weights = weights_checksum(model_dir)
    return resume.fingerprint(
        options, weights_sha256=weights, config=dataclasses.asdict(config),
        tokenizer_sha256=_files_sha256(model_dir, [n for n in METADATA_FILES if n != "config.json"]),
        hooks=[hook_name(*hook) for hook in hooks],
        template_sha256=hashlib.sha256(load_template(options.prompt_template).source.encode()).hexdigest(),
        software=software_versions(), device=device, created=created)


def make_job(options: PipelineOptions) -> Job:
    """Resolves and checks everything in the driver, before the graph is built: a mistake is a
    UsageError (or a CheckpointError, UnsupportedConfigError) naming the option, never a failure on
    the workers or a run that dead-letters everything."""
    spell_runner(options)
    ours = legacy_rewrites(options, extract_options(options))
    check_ranges(ours)
    if ours.resume and ours.overwrite:
        raise UsageError("--resume continues the run in --output and --overwrite deletes it: choose one")
    streaming = bool(options.view_as(StandardOptions).streaming)
    ours = ours.replace(output=location("--output", ours.output))
    check_gcs({"--input": ours.input or "", "--output": ours.output, "--model": ours.model,
               "--compilation_cache_dir": ours.compilation_cache_dir})
    ours = ours.replace(input=absolute_input(ours.input or sample_input()))
    check_input_outside_output(ours.input, ours.output)
    if not streaming:  # a streaming job may start before its first file lands
        input_paths(ours.input)
    usage(load_template, ours.prompt_template)
    usage(parse_encoder, ours.grid_encoder)
    check_positions(ours)
    buckets = usage(parse_buckets, ours.buckets, ours.max_seq_len)
    usage(mesh_sizes, ours.mesh)
    local = is_local(options)
    ours = ours.replace(compilation_cache_dir=compilation_cache_dir(ours.compilation_cache_dir, options,
                                                                   not local))
    if local:
        devices.start_listing(workers_in_this_process(options))  # counted while the checks below run
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    config = config_from_hf(load_hf_config(resolve_model_dir(ours.model, weights=False)))
    layers, sites = parse_layers(ours.layers, config.num_layers), parse_sites(ours.sites)
    check_record_size(ours, config)
    usage(check_context, config, ours.max_seq_len)
    dry_render(ours, config.vocab_size, created)
    # A local job's workers run on this host: their devices are counted (in a child process, so the
    # driver never holds the accelerator) and a mesh that does not cover them is refused here. A
    # remote job's workers check it against their own.
    device = None
    if local:
        try:
            device = devices.local_devices()
        except devices.DevicesUnavailable as error:
            raise UsageError(f"--mesh {ours.mesh}: {error}") from None
        usage(mesh_sizes, ours.mesh, device["count"])
        device = {"platform": device["platform"], "kind": device["kind"]}
    hooks = tuple((layer, site) for site in sites for layer in layers)
    plan = BatchPlan(buckets, ours.batch_size, ours.tokens_per_batch, ours.packing,
                     min(ours.pack_length or ours.max_seq_len, ours.max_seq_len),
                     ours.flush_seconds if streaming else 0)
    return Job(ours, config, hooks, plan, streaming, run_id=uuid.uuid4().hex[:12],
               fingerprint=run_fingerprint(ours, config, hooks, device, created), remote=runs_elsewhere(options))


def _check_output(job: Job) -> dict | None:
    """The output's checks (ownership.check_output) and, with --resume, the fingerprint's: reads
    only. Returns the fingerprint the output holds (None: none)."""
    o = job.options
    recorded = ownership.check_output(job.output, o.resume, set(SITES), o.overwrite)  # other sites: ours too
    if recorded is not None and not o.overwrite:
        resume.refuse_changes(job.output, recorded, job.fingerprint, o.accept_software_change)
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
        if recorded is not None and o.overwrite:
            ownership.remove_our_output(output, SITES, DEAD_LETTER_STAGES)
            recorded = None
        if not job.streaming:  # a streaming job's input is what arrives; its files are not known now
            files = inventory(o.input)
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
