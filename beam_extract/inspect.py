"""`python -m beam_extract.inspect OUT`: what an output directory holds, as a table and two plots.

Prints per hook the records, stored tokens, dtype, bytes and mean token norm, and the dead letters
by reason; writes inspect_norms.png (token L2 norms per hook) and inspect_tokens.png (tokens per
record) into --plots (default: the working directory), never into the output, which holds only
what runs of beam-extract wrote.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os

import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_extract.format.layout import MANIFEST_NAME, read_manifest
from beam_extract.format.storage import exists
from beam_extract.readers.reader import read_activations

SAMPLED_RECORDS = 2000  # per hook, for the plots


def table(output: str, manifest: dict) -> str:
    lines = [f"{'hook':<28} {'records':>9} {'tokens':>11} {'dtype':>9} {'MiB':>9} {'mean L2 norm':>13}"]
    for name, hook in manifest["hooks"].items():
        files = [f"{output}/{f}" for f in hook["files"]]
        size = sum(m.size_in_bytes for r in FileSystems.match(files) for m in r.metadata_list) if files else 0
        norm = f"{hook['mean_l2_norm']:.3f}" if hook["mean_l2_norm"] is not None else "-"
        lines.append(f"{name:<28} {hook['records']:>9} {hook['tokens']:>11} {manifest['output_dtype']:>9} "
                     f"{size / 2**20:>9.2f} {norm:>13}")
    counts = manifest["counts"]
    reasons = ", ".join(f"{k}: {v}" for k, v in counts["dead_letters"].items()) or "none"
    lines.append(f"lines read {counts['lines_read']}, samples {counts['samples']}, dead letters {reasons}")
    return "\n".join(lines)


def sampled_records(manifest: dict) -> str:
    records = max((hook["records"] for hook in manifest["hooks"].values()), default=0)
    return f"first {min(records, SAMPLED_RECORDS):,} of {records:,} records per hook"


def save_png(figure, path: str) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    with FileSystems.create(path) as handle:
        handle.write(buffer.getvalue())


def plots(output: str, manifest: dict, directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    norms, lengths = {}, []
    for name in manifest["hooks"]:
        records = list(itertools.islice(read_activations(output, name), SAMPLED_RECORDS))
        norms[name] = np.concatenate([np.linalg.norm(r["activations"], axis=-1) for r in records]) if records else []
        lengths = lengths or [r["n_tokens"] for r in records]  # every hook stores the same tokens of a sample
    sampled = sampled_records(manifest)
    written = []
    figure, axis = plt.subplots(figsize=(8, 5))
    for name, values in norms.items():
        axis.hist(values, bins=60, histtype="step", label=name)
    axis.set(xlabel="token L2 norm", ylabel="tokens", title=f"Activation norms per hook ({sampled})")
    axis.legend(fontsize="small")
    written.append(f"{directory}/inspect_norms.png")
    save_png(figure, written[-1])
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.hist(lengths, bins=40)
    axis.set(xlabel="stored tokens per record (the same at every hook)", ylabel="records",
             title=f"Tokens per record ({sampled})")
    written.append(f"{directory}/inspect_tokens.png")
    save_png(figure, written[-1])
    plt.close("all")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m beam_extract.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="An output directory (local or gs://) with a manifest.json")
    parser.add_argument("--plots", default=".", help="Directory for the plots, local or gs:// (default: the "
                        "working directory); not inside the output")
    args = parser.parse_args(argv)
    try:
        output, directory = checked_paths(args.output, args.plots)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    if not exists(f"{output}/{MANIFEST_NAME}"):
        parser.exit(2, f"{parser.prog}: {output} holds no {MANIFEST_NAME}: not an output of beam-extract, or its run "
                    "has not finished (continue an interrupted run with --resume)\n")
    manifest = read_manifest(output)
    print(table(output, manifest))
    for path in plots(output, manifest, directory):
        print(f"wrote {path}")
    print(f"the plots show the {sampled_records(manifest)} ({len(manifest['hooks'])} hooks)")


def checked_paths(output: str, plots: str) -> tuple[str, str]:
    """The output and the plots' directory, absolute; plots inside the output are refused (its owner
    would take them for foreign files and refuse --resume and --overwrite)."""
    output, plots = (p.rstrip("/") if "://" in p else os.path.abspath(os.path.expanduser(p)) for p in (output, plots))
    if plots == output or plots.startswith(f"{output}/"):
        raise ValueError(f"--plots {plots} is inside the output {output}, which holds only what beam-extract "
                         "wrote: choose another directory")
    return output, plots


if __name__ == "__main__":
    main()
