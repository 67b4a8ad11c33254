"""`python -m beam_extract` / `beam-extract`: run the extraction job and print a summary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from beam_extract import run_without_torch

# transformers says at import that PyTorch is missing; we use its tokenizers and configs only (and
# worker processes started from here inherit this).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# In a process of its own (`python -m beam_extract`, the `beam-extract` script, a Flex Template's
# launcher) and the workers it starts, torch is marked absent (why: beam_extract/__init__.py). Not
# when imported by another program.
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "beam-extract":
    run_without_torch()

from beam_extract.format.layout import read_manifest  # noqa: E402
from beam_extract.legacy import add_legacy_arguments  # noqa: E402
from beam_extract.model.config import UnsupportedConfigError
from beam_extract.model.weights import CheckpointError  # noqa: E402
from beam_extract.options import UsageError, add_arguments  # noqa: E402
from beam_extract.pipeline import run  # noqa: E402
from beam_extract.sink.ownership import OutputRefused  # noqa: E402


REFUSALS = (UsageError, OutputRefused, CheckpointError, UnsupportedConfigError)


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
        f"{counts['lines_dead_lettered']} dead-lettered + {counts['lines_blank']} blank: {lines_check}",
        f"  dead letters: {counts['dead_lettered']} ({reasons})",
        f"  wrote {files} TFRecord files for {len(hooks)} hooks ({stored} token activations) under {output}/",
        f"  manifest: {output}/manifest.json",
        f"  samples: {counts['samples']} produced = {counts['samples_committed']} committed, each once: "
        + ("ok" if manifest["ok"] else "NOT OK"),
        *[f"  PROBLEM: {problem}" for problem in manifest["problems"]],
        "  read back: from beam_extract.readers.reader import read_activations",
        f"             for r in read_activations('{output}', '{next(iter(hooks))}'): "
        "r['activations']  # [n_tokens, d_model]",
    ])


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"beam-extract: {message} (see --help)\n")


def argument_parser() -> argparse.ArgumentParser:
    """Our options alone, for --help (with defaults and ranges) and for clear errors before Beam starts."""
    parser = _OneLineParser(
        prog="beam-extract", description="Extract per-token transformer activations from JSONL into TFRecords.",
        epilog="Beam's own options are accepted too, e.g. --runner=DirectRunner (default) or DataflowRunner, "
               "--direct_num_workers, --direct_running_mode, and Dataflow's --project, --region, --temp_location.")
    add_arguments(parser, show_defaults=True)
    add_legacy_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    argument_parser().parse_known_args(argv)  # --help, or an error naming a bad option value
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        result, job = run(argv)
    except REFUSALS as refusal:  # a mistake in the command line, the model or the output: one line
        print(f"beam-extract: {refusal}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # how a local (streaming) job is stopped; the lock is released by then
        print("beam-extract: stopped. What was committed stays readable; the same command with --resume "
              "continues", file=sys.stderr)
        sys.exit(130)
    if job.remote:
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
