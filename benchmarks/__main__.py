"""Every performance goal, measured side by side against baselines from the same run.

    python -m benchmarks [--quick] [--only forward,pipeline,host,padding,output,memory,commits,runners,families,input,scale] [--readme]

--quick runs smaller inputs with one repeat, and only the sections that fit that in seconds (QUICK);
the others (whole jobs per size or per runner, seven model families) run in the full mode or when
named with --only.
    python -m benchmarks --recorded --readme   # after a new benchmarks/gpu.sh run: no measuring

Prints a table, writes benchmarks/results.json and benchmarks/results.md, and with --readme puts
the table into README.md. GPU figures come from the last `bash benchmarks/gpu.sh` run recorded in
benchmarks/results/ (a GPU is not part of this machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import commits, families, forward, host, input, memory, output, padding, pipeline, runners, scale
from benchmarks.projection import project
from benchmarks.report import Figure, machine, markdown, today, update_readme

SECTIONS = {"forward": forward, "pipeline": pipeline, "host": host, "padding": padding, "output": output,
            "memory": memory, "commits": commits, "runners": runners, "families": families, "input": input,
            "scale": scale}
# What --quick runs unless --only names sections: the rest start several whole jobs each.
QUICK = ("forward", "pipeline", "host", "padding", "output", "input")
HERE = Path(__file__).resolve().parent


def recorded_gpu_runs() -> tuple[list[Figure], list[dict]]:
    figures, runs = [], []
    for path in sorted((HERE / "results").glob("gpu-*.json")):
        run = json.loads(path.read_text())
        runs.append(run)
        where = f"{run['device']}, recorded {run.get('date', '')}".rstrip(", ")
        parity = run["parity"]
        figures.append(Figure("gpu", f"parity on the GPU ({where})",
                              f"fp32 max rel. error {parity['float32']['max_rel_error']:.1e}; bf16 min token cosine "
                              f"{parity['bfloat16']['min_token_cosine']:.5f}", parity["bfloat16"]["min_token_cosine"],
                              ">= 0.999"))
        for row in run["throughput"]:
            figures.append(Figure(
                "gpu", f"B={row['batch']} S={row['seq']} bf16 vs transformers bf16 sdpa ({where})",
                f"activations in host memory {row['ours_bf16_host_tok_s']:,.0f} vs {row['torch_bf16_host_tok_s']:,.0f} "
                f"tok/s; forward alone {row['ours_bf16_device_tok_s']:,.0f} vs {row['torch_bf16_device_tok_s']:,.0f} "
                f"tok/s ({row['ours_device_tflops']:.0f} TFLOP/s; ours writes into pinned host memory)",
                row["ratio_host"], ">= 1.1"))
    return figures, runs


def measure(sections: list[str], quick: bool) -> tuple[list[Figure], dict, str]:
    figures, raw, start = [], {}, time.perf_counter()
    for name in sections:
        began = time.perf_counter()
        section_figures, raw[name] = SECTIONS[name].measure(quick)
        figures += section_figures
        print(markdown(section_figures, f"{name}: {time.perf_counter() - began:.0f} s"), flush=True)
    mode = "quick" if quick else "full"
    header = (f"Measured {today()} on {machine()} (`python -m benchmarks{' --quick' if quick else ''}`, "
              f"{mode} mode, {time.perf_counter() - start:.0f} s).")
    return figures, raw, header


def measured_before() -> tuple[list[Figure], dict, str]:
    """The figures of the last run in results.json, less those derived from recorded GPU runs."""
    previous = json.loads((HERE / "results.json").read_text())
    figures = [Figure(**{k: v for k, v in row.items() if k != "met"}) for row in previous["figures"]
               if row["section"] not in ("gpu", "projection")]
    return figures, {name: previous["raw"][name] for name in SECTIONS if name in previous["raw"]}, previous["header"]


def refreshed(before: tuple[list[Figure], dict, str], figures: list[Figure], raw: dict, header: str,
              only: list[str]) -> tuple[list[Figure], dict, str]:
    """The last run's figures with the sections measured now in their place (new ones at the end)."""
    old_figures, old_raw, old_header = before
    fresh = {f.section for f in figures}
    merged, placed = [], set()
    for figure in old_figures:
        if figure.section not in fresh:
            merged.append(figure)
        elif figure.section not in placed:
            merged += [f for f in figures if f.section == figure.section]
            placed.add(figure.section)
    merged += [f for f in figures if f.section not in placed]
    note = f" Sections {', '.join(only)}: {today()}, `python -m benchmarks --only {','.join(only)}`."
    return merged, {**old_raw, **raw}, old_header if old_header.endswith(note) else old_header + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller inputs, one repeat, sections {','.join(QUICK)} unless --only (under 5 minutes)")
    parser.add_argument("--only", help=f"comma-separated sections to run (default: all: {','.join(SECTIONS)})")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--recorded", action="store_true",
                        help="measure nothing: the last results.json with the GPU runs recorded now")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else list(QUICK if args.quick else SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.recorded:
        figures, raw, header = measured_before()
    else:
        figures, raw, header = measure(only, args.quick)
        if set(only) != set(SECTIONS) and (HERE / "results.json").exists():
            figures, raw, header = refreshed(measured_before(), figures, raw, header, only)
    gpu_figures, raw["gpu_recorded"] = recorded_gpu_runs()
    mfus = {}
    if "forward" in raw:
        shapes = raw["forward"]["shapes"]
        row = next((row for row in shapes if row["seq"] == 1024), shapes[-1])  # the projection's context
        mfus[f"our bf16 forward on this CPU (S={row['seq']})"] = row["mfu_bf16"]
    for run in raw["gpu_recorded"]:
        if run.get("gemm_peak_tflops"):
            best = max(run["throughput"], key=lambda row: row["ours_device_tflops"])
            mfus[f"our bf16 forward on the {run['device']}"] = best["ours_device_tflops"] / run["gemm_peak_tflops"]
    figures += gpu_figures + project(mfus)
    table = markdown(figures, header)
    print(table)
    (HERE / "results.json").write_text(json.dumps(
        {"date": today(), "machine": machine(), "header": header, "figures": [f.row() for f in figures], "raw": raw},
        indent=1, default=str))
    (HERE / "results.md").write_text(table)
    if args.readme:
        update_readme(table)


if __name__ == "__main__":
    main()
