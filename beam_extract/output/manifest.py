"""OUT/manifest.json: what was run, on what, what came out. Written last, atomically."""

from __future__ import annotations

import dataclasses
import datetime
import json
from importlib import metadata

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_extract.model import hook_name
from beam_extract.model.config import ModelConfig
from beam_extract.model.qwen2 import Hook
from beam_extract.output.schema import FEATURES

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def build_manifest(*, options: dict, config: ModelConfig, weights_sha256: str, hooks: tuple[Hook, ...],
                   files: list[str], lines_read: int, samples: int, dead_letters: dict[str, int],
                   hook_stats: dict[int, tuple[int, int, float, float]], batching: dict) -> dict:
    """hook_stats: hook index -> (records, tokens, sum of token L2 norms, sum of squared norms);
    batching: SummarizeBatches' output."""
    output = options["output"].rstrip("/")
    per_hook = {}
    for index, hook in enumerate(hooks):
        records, tokens, sum_norm, sum_sq = hook_stats.get(index, (0, 0, 0.0, 0.0))
        prefix = f"{output}/{hook[1]}/layer_{hook[0]:02d}/"
        per_hook[hook_name(*hook)] = {
            "site": hook[1],
            "layer": hook[0],
            "records": records,
            "tokens": tokens,
            "mean_l2_norm": sum_norm / tokens if tokens else None,
            "mean_squared_norm": sum_sq / tokens if tokens else None,
            "files": sorted(f.removeprefix(f"{output}/") for f in files if f.startswith(prefix)),
        }
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "beam_extract_version": metadata.version("beam-extract"),
        "model": {"name": options["model"], "weights_sha256": weights_sha256, "compute_dtype": options["dtype"],
                  "config": dataclasses.asdict(config)},
        "tokenizer": {"source": options["model"]},
        "output_dtype": options["output_dtype"],
        "sites": sorted({site for _, site in hooks}),
        "layers": sorted({layer for layer, _ in hooks}),
        "d_model": config.hidden_size,
        "feature_spec": {name: {"kind": kind, "shape": shape, "meaning": meaning}
                         for name, (kind, shape, meaning) in FEATURES.items()},
        "options": options,
        "counts": {
            "lines_read": lines_read,
            "samples": samples,
            "dead_letters": dict(sorted(dead_letters.items())),
            "dead_lettered": sum(dead_letters.values()),
        },
        "hooks": per_hook,
        "batching": batching,
        "dead_letter_files": sorted(f.removeprefix(f"{output}/") for f in files if "/dead_letter/" in f),
    }


class SummarizeBatches(beam.CombineFn):
    """BatchStats of every forward -> the manifest's `batching` section."""

    def create_accumulator(self):
        return 0, 0, 0, frozenset(), 0, 0.0

    def add_input(self, acc, stats):
        batches, real, computed, lengths, compilations, seconds = acc
        return (batches + 1, real + stats.real_tokens, computed + stats.computed_tokens,
                lengths | {stats.row_length}, compilations + bool(stats.compile_seconds),
                seconds + stats.compile_seconds)

    def merge_accumulators(self, accumulators):
        batches, real, computed, lengths, compilations, seconds = zip(*accumulators)
        return sum(batches), sum(real), sum(computed), frozenset().union(*lengths), sum(compilations), sum(seconds)

    def extract_output(self, acc):
        batches, real, computed, lengths, compilations, seconds = acc
        return {
            "batches": batches,
            "real_tokens": real,
            "computed_tokens": computed,
            "real_over_computed": real / computed if computed else None,
            "row_lengths": sorted(lengths),
            "compilations": compilations,
            "compile_seconds": round(seconds, 3),
        }


def write_manifest(output: str, manifest: dict) -> str:
    """Writes to a temporary name, then renames: readers never see a partial manifest."""
    final = f"{output.rstrip('/')}/{MANIFEST_NAME}"
    temporary = final + ".tmp"
    with FileSystems.create(temporary) as handle:
        handle.write(json.dumps(manifest, indent=2).encode("utf-8"))
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([temporary], [final])
    return final


def read_manifest(output: str) -> dict:
    with FileSystems.open(f"{output.rstrip('/')}/{MANIFEST_NAME}") as handle:
        return json.loads(handle.read())
