"""Where a job's time goes, phase by phase: `python -m benchmarks.startup [beam-extract options]`.

Runs the job as `beam-extract` does, in a fresh process (default: `make run`'s job into a temporary
output), with the driver's steps and the runner's timed from inside: imports, each driver check,
graph construction, the runner (and within it the model load and compiles), the manifest. Prints
wall and CPU seconds per phase as JSON. Phases inside the runner overlap other work (workers are
threads), so their CPU is the process's over that time, not theirs alone.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = """
import time, resource, sys
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
started, started_cpu = time.perf_counter(), cpu()
sys.argv[0] = "beam-extract"
import beam_extract.__main__ as cli
import beam_extract.extract as extract
import beam_extract.job as job
import beam_extract.pipeline as pipeline
import apache_beam as beam
times = {"imports": [time.perf_counter() - started, cpu() - started_cpu]}

def timed(owner, name, label):
    function = getattr(owner, name)
    def wrapper(*args, **kwargs):
        wall, used = time.perf_counter(), cpu()
        try:
            return function(*args, **kwargs)
        finally:
            total = times.setdefault(label, [0.0, 0.0])
            total[0] += time.perf_counter() - wall
            total[1] += cpu() - used
    setattr(owner, name, wrapper)

for owner, name, label in [
        (pipeline, "make_job", "driver checks (make_job)"), (job, "load_hf_config", "  model config"),
        (job, "dry_render", "  tokenizer load + dry render"), (job.devices, "local_devices", "  device listing (wait)"),
        (job, "run_fingerprint", "  fingerprint (weights sha256)"), (pipeline, "claim_output", "claim output"),
        (pipeline, "build", "graph construction"), (beam.Pipeline, "run", "runner (all stages)"),
        (extract, "load_model", "  model load (in a worker)"), (pipeline, "build_manifest", "  manifest"),
        (pipeline, "write_manifest", "  manifest")]:
    timed(owner, name, label)
try:
    cli.main(sys.argv[1:])
finally:
    times["whole process"] = [time.perf_counter() - started, cpu() - started_cpu]
    print("PHASES " + json.dumps(times), flush=True)
"""


def phases(args: list[str]) -> dict:
    """The job's phases (wall, CPU seconds), its children's CPU (the device listing) and its manifest's
    batching figures."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", "import json\n" + PHASES, *args], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).resolve().parent.parent)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((line for line in out.stdout.splitlines() if line.startswith("PHASES ")), None)
    if out.returncode or line is None:
        raise RuntimeError(out.stderr[-3000:])
    result = {"phases": json.loads(line.split(" ", 1)[1]),
              "cpu_with_children": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    output = next((a.split("=", 1)[1] for a in args if a.startswith("--output=")), None)
    if output:
        batching = json.loads((Path(output) / "manifest.json").read_text())["batching"]
        result["compile"] = {k: batching.get(k) for k in ("compilations", "compile_seconds", "forward_seconds")}
    return result


def main() -> None:
    args = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        if not any(a.startswith("--output=") for a in args):
            args = [*args, f"--output={tmp}/out"]
        if not any(a.startswith("--runner=") for a in args):
            args = ["--runner=DirectRunner", "--overwrite", *args]
        result = phases(args)
    for label, (wall, cpu) in result["phases"].items():
        print(f"{label:34s} {wall:6.1f} s wall {cpu:6.1f} CPU-s")
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}))


if __name__ == "__main__":
    main()
