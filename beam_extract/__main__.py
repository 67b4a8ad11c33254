"""`python -m beam_extract` / `beam-extract`: run the extraction job and print a summary."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from apache_beam.options.pipeline_options import PipelineOptions

from beam_extract.options import ExtractOptions, template_switches
from beam_extract.output.manifest import read_manifest
from beam_extract.output.ownership import OutputRefused
from beam_extract.job import is_local
from beam_extract.pipeline import run


def summary(manifest: dict, seconds: float) -> str:
    counts, hooks = manifest["counts"], manifest["hooks"]
    stored = sum(h["tokens"] for h in hooks.values())
    tokens = max((h["tokens"] for h in hooks.values()), default=0)  # tokens per hook = tokens run through
    files = sum(len(h["files"]) for h in hooks.values())
    output = manifest["options"]["output"]
    reasons = ", ".join(f"{k}={v}" for k, v in counts["dead_letters"].items()) or "none"
    lines_check = "ok" if counts["lines_unaccounted"] == 0 else f"{counts['lines_unaccounted']} LINES UNACCOUNTED FOR"
    resumed = f" ({counts['samples_resumed']} committed by the run resumed)" if counts["samples_resumed"] else ""
    return "\n".join([
        f"beam-extract: {counts['lines_read']} lines -> {counts['samples']} samples{resumed}, "
        f"{tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s end to end)",
        f"  lines: {counts['lines_read']} read = {counts['lines_with_samples']} with samples + "
        f"{counts['lines_dead_lettered']} dead-lettered: {lines_check}",
        f"  dead letters: {counts['dead_lettered']} ({reasons})",
        f"  wrote {files} TFRecord files for {len(hooks)} hooks ({stored} token activations) under {output}/",
        f"  manifest: {output}/manifest.json",
        f"  samples: {counts['samples']} produced = {counts['samples_committed']} committed, each once: "
        + ("ok" if manifest["ok"] else "NOT OK"),
        *[f"  PROBLEM: {problem}" for problem in manifest["problems"]],
        "  read back: from beam_extract.output.reader import read_activations",
        f"             for r in read_activations('{output}', '{next(iter(hooks))}'): "
        "r['activations']  # [n_tokens, d_model]",
    ])


def argument_parser() -> argparse.ArgumentParser:
    """Our options alone, for --help and for clear errors before Beam starts."""
    parser = argparse.ArgumentParser(
        prog="beam-extract", description="Extract per-token Qwen2 activations from JSONL into TFRecords.",
        epilog="Beam's own options are accepted too, e.g. --runner=DirectRunner (default) or DataflowRunner, "
               "--direct_num_workers, --direct_running_mode, and Dataflow's --project, --region, --temp_location.")
    ExtractOptions._add_argparse_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = template_switches(sys.argv[1:] if argv is None else argv)
    argument_parser().parse_known_args(argv)  # --help, or an error naming a bad option value
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        result, job = run(argv)
    except OutputRefused as refusal:
        print(f"beam-extract: {refusal}", file=sys.stderr)
        sys.exit(2)
    if not is_local(PipelineOptions(argv)):
        progress = (f"an index per window under {job.output}/_windows/" if job.streaming
                    else f"the manifest will be at {job.output}/manifest.json")
        print(f"beam-extract: submitted ({result.state}); {progress}")
        return
    manifest = read_manifest(job.output)
    print(summary(manifest, time.perf_counter() - start))
    if not manifest["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
