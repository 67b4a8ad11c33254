"""Every performance goal, measured side by side against baselines from the same run.

    python -m benchmarks [--quick] [--only forward,pipeline,padding,output,memory] [--readme]

Prints a table, writes benchmarks/results.json and benchmarks/results.md, and with --readme puts
the table into README.md. GPU figures come from the last `bash benchmarks/gpu.sh` run recorded in
benchmarks/results/ (a GPU is not part of this machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import forward, memory, output, padding, pipeline
from benchmarks.projection import project
from benchmarks.report import Figure, machine, markdown, today, update_readme

SECTIONS = {"forward": forward, "pipeline": pipeline, "padding": padding, "output": output, "memory": memory}
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
                f"on the GPU {row['ours_bf16_device_tok_s']:,.0f} vs {row['torch_bf16_device_tok_s']:,.0f} tok/s "
                f"({row['ours_device_tflops']:.0f} TFLOP/s); copied to host {row['ours_bf16_host_tok_s']:,.0f} vs "
                f"{row['torch_bf16_host_tok_s']:,.0f} tok/s", row["ratio_device"], ">= 1.1"))
    return figures, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, one repeat (a few minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    only = args.only.split(",")
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    figures, raw, start = [], {}, time.perf_counter()
    for name in only:
        began = time.perf_counter()
        section_figures, raw[name] = SECTIONS[name].measure(args.quick)
        figures += section_figures
        print(markdown(section_figures, f"{name}: {time.perf_counter() - began:.0f} s"), flush=True)
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
    mode = "quick" if args.quick else "full"
    header = (f"Measured {today()} on {machine()} (`python -m benchmarks{' --quick' if args.quick else ''}`, "
              f"{mode} mode, {time.perf_counter() - start:.0f} s).")
    table = markdown(figures, header)
    print(table)
    (HERE / "results.json").write_text(json.dumps(
        {"date": today(), "machine": machine(), "mode": mode, "figures": [f.row() for f in figures], "raw": raw},
        indent=1, default=str))
    (HERE / "results.md").write_text(table)
    if args.readme:
        update_readme(table)


if __name__ == "__main__":
    main()
