"""OUT/manifest.json: what was run, on what, what came out. Written last, atomically."""

from __future__ import annotations

import dataclasses
import datetime
from importlib import metadata

from beam_extract.accounting.invariants import RunTotals, run_counts
from beam_extract.format.layout import MANIFEST_NAME
from beam_extract.format.schema import FEATURES
from beam_extract.hooks import Hook, hook_name
from beam_extract.model.config import ModelConfig
from beam_extract.options import JobOptions
from beam_extract.sink.commits import write_json

# 2: shard groups, fingerprint and lock, ids by file and line, `ok` and `problems`; 3: records hold their
# whole sequence's token ids, hooks their normalisation
FORMAT_VERSION = 3


def build_manifest(*, options: JobOptions, config: ModelConfig, weights_sha256: str, hooks: tuple[Hook, ...],
                   groups: list[dict], totals: RunTotals, run_id: str) -> dict:
    """Output files and activation statistics come from the accepted groups (of this run and any run
    it resumed, each with its sample count); counts of lines and dead letters from this run, which
    re-reads every line; committed samples from the ids in all groups (`totals.committed_ids`)."""
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "beam_extract_version": metadata.version("beam-extract"),
        "model": {"name": options.model, "weights_sha256": weights_sha256, "compute_dtype": options.dtype,
                  "config": dataclasses.asdict(config)},
        "tokenizer": {"source": options.model},
        "output_dtype": options.output_dtype,
        "sites": sorted({site for _, site in hooks}),
        "layers": sorted({layer for layer, _ in hooks}),
        "d_model": config.hidden_size,
        **({"z_head_layout": config.head_layout()} if any(site == "z" for _, site in hooks) else {}),
        "feature_spec": {name: {"kind": kind, "shape": shape, "meaning": meaning}
                         for name, (kind, shape, meaning) in FEATURES.items()},
        "options": options.as_dict(),
        "counts": run_counts(totals),
        "hooks": with_normalisation_factors(summarize_hooks(hooks, groups), config, options.norm_exclude_first),
        "batching": totals.batching,
        "commits": len(groups),
        "commit_groups": sorted(g["group"] for g in groups),
        "dead_letter_files": relative_paths(options.output, totals.dead_letter_files),
    }


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


def write_manifest(output: str, manifest: dict) -> str:
    """Written last, atomically: readers never see a partial manifest."""
    path = f"{output.rstrip('/')}/{MANIFEST_NAME}"
    write_json(path, manifest)
    return path
