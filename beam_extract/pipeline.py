"""The extraction pipeline, wired on one screen:

JSONL lines -> parse -> tokenize -> fixed-shape batches -> forward -> TFRecords per hook + manifest,
with every failure in OUT/dead_letter/ and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

from beam_extract.arc.encoders import parse_encoder
from beam_extract.arc.prompt import load_template
from beam_extract.batching import BatchPlan, BatchSamples, parse_buckets
from beam_extract.extract import BATCH_STATS, DEAD_LETTER, ExtractDoFn
from beam_extract.io.sources import ReadLines
from beam_extract.model.config import ModelConfig, config_from_hf, load_hf_config
from beam_extract.model.qwen2 import Hook
from beam_extract.model.weights import resolve_model_dir, weights_checksum
from beam_extract.options import extract_options, parse_layers, parse_sites, sample_input
from beam_extract.output.manifest import SummarizeBatches, build_manifest, write_manifest
from beam_extract.output.writer import WriteActivations, WriteDeadLetters
from beam_extract.stages import ParseDoFn, TokenizeDoFn, expand_views

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    """What the driver resolves before building the graph."""

    options: dict  # our options only (no Beam/cloud options, which may hold credentials)
    config: ModelConfig
    hooks: tuple[Hook, ...]
    plan: BatchPlan

    @property
    def output(self) -> str:
        return self.options["output"]


def make_job(options: PipelineOptions) -> Job:
    ours = extract_options(options)
    ours["input"] = ours["input"] or sample_input()
    if "://" not in ours["output"]:
        ours["output"] = os.path.abspath(ours["output"])
    load_template(ours["prompt_template"]), parse_encoder(ours["grid_encoder"])  # fail here, not on workers
    for name in ("views_per_task", "batch_size", "max_seq_len", "num_shards"):
        if ours[name] < 1:
            raise ValueError(f"--{name} must be at least 1")
    config = config_from_hf(load_hf_config(resolve_model_dir(ours["model"], weights=False)))
    layers, sites = parse_layers(ours["layers"], config.num_layers), parse_sites(ours["sites"])
    plan = BatchPlan(parse_buckets(ours["buckets"], ours["max_seq_len"]), ours["batch_size"],
                     ours["tokens_per_batch"], ours["packing"], min(ours["pack_length"] or ours["max_seq_len"], ours["max_seq_len"]))
    return Job(ours, config, tuple((layer, site) for site in sites for layer in layers), plan)


def _finish(_, job: Job, lines_read: int, samples: int, dead_letters: dict, hook_stats: dict, files: list,
            batching: dict) -> str:
    """Runs after every write has finished (its side inputs are the written files)."""
    manifest = build_manifest(
        options=job.options, config=job.config, hooks=job.hooks, files=files, lines_read=lines_read,
        samples=samples, dead_letters=dead_letters, hook_stats=hook_stats, batching=batching,
        weights_sha256=weights_checksum(resolve_model_dir(job.options["model"])),
    )
    return write_manifest(job.output, manifest)


def build(pipeline: beam.Pipeline, job: Job) -> None:
    o = job.options
    lines = pipeline | "ReadLines" >> ReadLines(o["input"])
    parsed = lines | "Parse" >> beam.ParDo(ParseDoFn(o["input_format"], o["text_field"])).with_outputs(
        DEAD_LETTER, main="records")
    samples = (
        parsed.records
        | "Augment" >> beam.FlatMap(expand_views, o["seed"], o["views_per_task"])
        | "Tokenize" >> beam.ParDo(TokenizeDoFn(o["model"], o["max_seq_len"], o["prompt_template"],
                                                o["grid_encoder"], o["include_answer"])).with_outputs(
            DEAD_LETTER, main="samples")
    )
    extracted = (
        samples.samples
        | "Batch" >> BatchSamples(job.plan)
        | "Extract" >> beam.ParDo(ExtractDoFn(o["model"], o["dtype"], o["mesh"], job.hooks, o["output_dtype"]))
        .with_outputs(DEAD_LETTER, BATCH_STATS, main="records")
    )
    dead = (parsed[DEAD_LETTER], samples[DEAD_LETTER], extracted[DEAD_LETTER]) | "AllDeadLetters" >> beam.Flatten()
    files = (
        (extracted.records | "Write" >> WriteActivations(o["output"], job.hooks, o["num_shards"]),
         dead | "WriteDeadLetters" >> WriteDeadLetters(o["output"]))
        | "WrittenFiles" >> beam.Flatten()
    )
    hook_stats = (
        extracted.records
        | "HookStats" >> beam.Map(lambda r: (r.hook_index, (1, r.n_tokens, r.sum_l2_norm, r.sum_squared_norm)))
        | "SumHookStats" >> beam.CombinePerKey(beam.combiners.TupleCombineFn(sum, sum, sum, sum))
    )
    (
        pipeline
        | "Once" >> beam.Create([None])
        | "Manifest" >> beam.Map(
            _finish, job,
            lines_read=beam.pvalue.AsSingleton(lines | "CountLines" >> beam.combiners.Count.Globally()),
            samples=beam.pvalue.AsSingleton(samples.samples | "CountSamples" >> beam.combiners.Count.Globally()),
            dead_letters=beam.pvalue.AsDict(
                dead | "Reasons" >> beam.Map(lambda d: d.reason) | "CountReasons" >> beam.combiners.Count.PerElement()),
            hook_stats=beam.pvalue.AsDict(hook_stats),
            files=beam.pvalue.AsList(files),
            batching=beam.pvalue.AsSingleton(extracted[BATCH_STATS] | "SummarizeBatches" >> beam.CombineGlobally(
                SummarizeBatches())),
        )
    )


def _local_runner_without_download(options: PipelineOptions) -> None:
    """Beam 2.77's DirectRunner first tries to download the Prism runner, then falls back to the
    in-process FnApiRunner. We go to the FnApiRunner directly: no network, same semantics, and it
    honours --direct_num_workers and --direct_running_mode."""
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "direct") and not standard.streaming:
        standard.runner = "FnApiRunner"


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> tuple[PipelineResult, Job]:
    options = PipelineOptions(argv)
    job = make_job(options)
    _local_runner_without_download(options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build(pipeline, job)
    result = pipeline.run()
    result.wait_until_finish()
    return result, job
