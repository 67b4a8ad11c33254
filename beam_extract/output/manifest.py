"""OUT/manifest.json: what was run, on what, what came out. Written last, atomically."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from importlib import metadata

import apache_beam as beam
import numpy as np

from beam_extract.hooks import Hook, hook_name
from beam_extract.model.config import ModelConfig
from beam_extract.output.schema import FEATURES
from beam_extract.output.commits import write_json
from beam_extract.output.layout import MANIFEST_NAME

# 2: shard groups, fingerprint and lock, ids by file and line, `ok` and `problems`; 3: records hold their
# whole sequence's token ids, hooks their normalisation
FORMAT_VERSION = 3
# Dead-letter reasons of whole input files that lost lines (`not_a_file` lost none: it was never input).
LOST_LINES = ("truncated_file", "corrupt_file", "unreadable_file", "bad_file_name", "expansion_too_large")


def _union(a: bytes, b: bytes) -> bytes:
    size = max(len(a), len(b))
    return (np.pad(np.frombuffer(a, np.uint8), (0, size - len(a)))
            | np.pad(np.frombuffer(b, np.uint8), (0, size - len(b)))).tobytes()


class LineBitmaps(beam.CombineFn):
    """(line number, produced a sample?) of one input file -> two bitmaps of line numbers: lines
    with a sample, lines with a dead letter. A file of millions of lines costs kilobytes."""

    def create_accumulator(self):
        return bytearray(), bytearray()

    def add_input(self, acc, outcome):
        line, produced = outcome
        bits = acc[0] if produced else acc[1]
        if line >> 3 >= len(bits):
            bits.extend(bytes((line >> 3) + 1 - len(bits)))
        bits[line >> 3] |= 1 << (line & 7)
        return acc

    def merge_accumulators(self, accumulators):
        samples, dead = b"", b""
        for acc in accumulators:
            samples, dead = _union(samples, bytes(acc[0])), _union(dead, bytes(acc[1]))
        return bytearray(samples), bytearray(dead)

    def extract_output(self, acc):
        return bytes(acc[0]), bytes(acc[1])


class CountLineOutcomes(beam.CombineFn):
    """Bitmap pairs of one file (from several stages), or triples whose third marks lines with samples
    committed by the run resumed -> {with_samples, dead_lettered, skipped}. A line that produced any
    sample counts as such, even if some of its samples failed; one whose samples were all committed
    before and that nothing else happened to now is also `skipped` (re-read, not new)."""

    def create_accumulator(self):
        return b"", b"", b""

    def add_input(self, acc, bitmaps):
        return tuple(_union(mine, theirs) for mine, theirs in itertools.zip_longest(acc, bitmaps, fillvalue=b""))

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            merged = self.add_input(merged, acc)
        return merged

    def extract_output(self, acc):
        size = max(len(bits) for bits in acc)
        samples, dead, resumed = (np.pad(np.frombuffer(b, np.uint8), (0, size - len(b))) for b in acc)
        return {"with_samples": int(np.unpackbits(samples | resumed).sum()),
                "dead_lettered": int(np.unpackbits(dead & ~(samples | resumed)).sum()),
                "skipped": int(np.unpackbits(resumed & ~samples & ~dead).sum())}


def line_and_sample_counts(lines_read: int, lines: dict[str, int], samples: int, resumed: int,
                           dead_letters: dict[str, int]) -> dict:
    """The accounting of a run (manifest) or of a streaming window (its index). `lines_read` counts
    the lines passed on, `lines["blank"]` the blank ones the reader counted instead."""
    with_samples, dead_lettered = lines.get("with_samples", 0), lines.get("dead_lettered", 0)
    blank = lines.get("blank", 0)
    return {
        "lines_read": lines_read + blank,
        "lines_with_samples": with_samples,
        "lines_dead_lettered": dead_lettered,
        "lines_blank": blank,
        "lines_unaccounted": lines_read - with_samples - dead_lettered,
        "samples": samples + resumed,
        "samples_extracted_now": samples,
        "samples_resumed": resumed,
        "dead_letters": dict(sorted(dead_letters.items())),
        "dead_lettered": sum(dead_letters.values()),
    }


def build_manifest(*, options: dict, config: ModelConfig, weights_sha256: str, hooks: tuple[Hook, ...],
                   groups: list[dict], lines_read: int, lines: dict[str, int], samples: int, resumed: int,
                   dead_letters: dict[str, int], batching: dict, dead_letter_files: list[str], committed_now: int,
                   committed_ids: dict, run_id: str) -> dict:
    """Output files and activation statistics come from the accepted groups (of this run and any run
    it resumed, each with its sample count); counts of lines and dead letters from this run, which
    re-reads every line; `committed_ids` counts the ids in all groups, and distinct ones."""
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "beam_extract_version": metadata.version("beam-extract"),
        "model": {"name": options["model"], "weights_sha256": weights_sha256, "compute_dtype": options["dtype"],
                  "config": dataclasses.asdict(config)},
        "tokenizer": {"source": options["model"]},
        "output_dtype": options["output_dtype"],
        "sites": sorted({site for _, site in hooks}),
        "layers": sorted({layer for layer, _ in hooks}),
        "d_model": config.hidden_size,
        **({"z_head_layout": config.head_layout()} if any(site == "z" for _, site in hooks) else {}),
        "feature_spec": {name: {"kind": kind, "shape": shape, "meaning": meaning}
                         for name, (kind, shape, meaning) in FEATURES.items()},
        "options": options,
        "counts": {
            **line_and_sample_counts(lines_read, lines, samples, resumed, dead_letters),
            "samples_committed": committed_ids.get("distinct", 0),
            "samples_committed_now": committed_now,
            "samples_committed_twice": committed_ids.get("total", 0) - committed_ids.get("distinct", 0),
        },
        "hooks": with_normalisation_factors(summarize_hooks(hooks, groups), config, options["norm_exclude_first"]),
        "batching": batching,
        "commits": len(groups),
        "commit_groups": sorted(g["group"] for g in groups),
        "dead_letter_files": relative_paths(options["output"], dead_letter_files),
    }


def problems(counts: dict, dead_letters: dict, whole_run: bool = True) -> list[str]:
    """The invariants, checked: each one that fails, in words (none: ok). A streaming window
    (`whole_run` False) is checked on its own lines and this run's commits; a whole run also on
    everything committed, by it and by the run it resumed. A `model_oom` sample is a dead letter,
    not a loss: it is extracted but not committed."""
    found = []
    oom, broken = dead_letters.get("model_oom", 0), dead_letters.get("non_finite", 0)
    changed = dead_letters.get("changed_since_commit", 0)
    if broken:
        found.append(f"{broken} samples had NaN or infinite activations (non_finite dead letters): check the weights")
    failed = oom + broken  # extracted, then dead-lettered: not committed
    if counts["lines_unaccounted"]:
        found.append(f"{counts['lines_unaccounted']} lines read are neither written, dead-lettered nor blank")
    if lost := sum(dead_letters.get(reason, 0) for reason in LOST_LINES):
        found.append(f"{lost} input files were not read to their end (see the read dead letters)")
    if counts["samples_extracted_now"] != counts["samples_committed_now"] + failed:
        found.append(f"{counts['samples_extracted_now']} samples extracted but {counts['samples_committed_now']} "
                     f"committed by this run{f' and {failed} dead-lettered by the extraction' if failed else ''}")
    if counts["samples_committed_twice"]:
        found.append(f"{counts['samples_committed_twice']} samples committed more than once")
    if changed:
        found.append(f"{changed} samples committed by the run resumed no longer match their input "
                     "(changed_since_commit dead letters)")
    if not whole_run:
        return found
    if counts["samples_committed"] != counts["samples"] - failed + changed:
        found.append(f"{counts['samples_committed']} samples committed for {counts['samples'] - failed} produced "
                     "from this input (the resumed run committed samples of other input)")
    if not counts["samples_committed"]:
        found.append("no sample was written")
    return found


def summarize_hooks(hooks: tuple[Hook, ...], commits: list[dict]) -> dict:
    """Per hook: records, tokens, mean norms (of every stored token, and of those the normalisation
    counts) and files, summed over commits."""
    per_hook = {}
    for layer, site in hooks:
        name = hook_name(layer, site)
        parts = [c["hooks"][name] for c in commits if name in c["hooks"]]

        def means(prefix: str) -> dict:
            tokens = sum(p[f"{prefix}tokens"] for p in parts)
            return {"tokens": tokens,
                    "mean_l2_norm": sum(p[f"{prefix}sum_l2_norm"] for p in parts) / tokens if tokens else None,
                    "mean_squared_norm": sum(p[f"{prefix}sum_squared_norm"] for p in parts) / tokens if tokens else None}

        per_hook[name] = {"site": site, "layer": layer, "records": sum(p["records"] for p in parts), **means(""),
                          "normalisation": means("norm_"), "files": sorted(f for p in parts for f in p["files"])}
    return per_hook


def with_normalisation_factors(hooks: dict, config: ModelConfig, exclude_first: int) -> dict:
    """Each hook's width and its normalisation with the factors SAE trainers scale activations by,
    from its tokens at positions >= exclude_first: SAELens's `sqrt(width) / mean L2 norm` (the
    hook's width: d_model, n_heads * d_head or d_mlp), and the factor giving unit mean squared norm
    (Gemma Scope's)."""
    for summary in hooks.values():
        width = summary["width"] = config.width(summary["site"])
        norm = summary["normalisation"]
        norm["excluded_first_positions"] = exclude_first
        norm["saelens_scaling_factor"] = width ** 0.5 / norm["mean_l2_norm"] if norm["mean_l2_norm"] else None
        norm["unit_mean_squared_norm_factor"] = (norm["mean_squared_norm"] ** -0.5 if norm["mean_squared_norm"]
                                                 else None)
    return hooks


def relative_paths(output: str, paths: list[str]) -> list[str]:
    return sorted(path.removeprefix(f"{output}/") for path in paths)


class SummarizeBatches(beam.CombineFn):
    """BatchStats of every forward -> the manifest's `batching` section."""

    def create_accumulator(self):
        return {"batches": 0, "real_tokens": 0, "computed_tokens": 0, "batch_shapes": {}, "compilations": 0,
                "compile_cache_hits": 0, "compile_seconds": 0.0, "forward_seconds": 0.0}

    def add_input(self, acc, stats):
        shape = f"{stats.computed_tokens // stats.row_length}x{stats.row_length}"
        return self.merge_accumulators([acc, {
            "batches": 1, "real_tokens": stats.real_tokens, "computed_tokens": stats.computed_tokens,
            "batch_shapes": {shape: 1}, "compilations": int(bool(stats.compile_seconds)),
            "compile_cache_hits": int(stats.compile_cached), "compile_seconds": stats.compile_seconds,
            "forward_seconds": stats.forward_seconds}])

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()  # the BundleBasedDirectRunner merges empty groups too
        for acc in accumulators:
            for name, value in acc.items():
                if name == "batch_shapes":
                    for shape, n in value.items():
                        merged[name][shape] = merged[name].get(shape, 0) + n
                else:
                    merged[name] += value
        return merged

    def extract_output(self, acc):
        shapes = acc["batch_shapes"]
        return {
            "batches": acc["batches"],
            "real_tokens": acc["real_tokens"],
            "computed_tokens": acc["computed_tokens"],
            "real_over_computed": acc["real_tokens"] / acc["computed_tokens"] if acc["computed_tokens"] else None,
            "row_lengths": sorted({int(shape.split("x")[1]) for shape in shapes}),
            "batch_shapes": dict(sorted(shapes.items())),  # "rows x length" -> batches of that shape
            "compilations": acc["compilations"],  # forwards compiled or loaded from the compilation cache
            "compile_cache_hits": acc["compile_cache_hits"],  # of them, loaded
            "compile_seconds": round(acc["compile_seconds"], 3),
            "forward_seconds": round(acc["forward_seconds"], 3),  # compiling aside
        }


class SumCounts(beam.CombineFn):
    """(name, count) pairs -> {name: total}."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, pair):
        name, n = pair
        acc[name] = acc.get(name, 0) + n
        return acc

    def merge_accumulators(self, accumulators):
        merged = {}
        for acc in accumulators:
            for name, n in acc.items():
                merged[name] = merged.get(name, 0) + n
        return merged

    def extract_output(self, acc):
        return acc


class SummarizeCommits(beam.CombineFn):
    """Shard groups -> their ids and the per-hook summary (not their sample ids)."""

    def __init__(self, hooks: tuple[Hook, ...]):
        self._hooks = hooks

    def create_accumulator(self):
        return []

    def add_input(self, acc, commit):
        acc.append({"commit": commit["group"], "hooks": commit["hooks"]})
        return acc

    def merge_accumulators(self, accumulators):
        return [commit for acc in accumulators for commit in acc]

    def extract_output(self, acc):
        return {"commits": sorted(c["commit"] for c in acc), "hooks": summarize_hooks(self._hooks, acc)}


def write_manifest(output: str, manifest: dict) -> str:
    """Written last, atomically: readers never see a partial manifest."""
    path = f"{output.rstrip('/')}/{MANIFEST_NAME}"
    write_json(path, manifest)
    return path
