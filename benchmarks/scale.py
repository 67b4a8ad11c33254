"""Per-sample and per-worker cost against the run's size: the real pipeline with the simulated
device of `benchmarks/host.py`, and the output's metadata at many commit groups.

- jobs: short generated documents (3 to 12 words) at 10^4 and 10^5 samples (10^3 and 10^4 with
  --quick; 10^6 too with BENCH_SCALE_MAX=1000000), in one big file, and at the largest size also in
  1,000 small files; two worker processes (`--direct_num_workers=2
  --direct_running_mode=multi_processing`) with the embedded tiny model's widths (d_model 64) and a
  forward that computes nothing. Recorded per size: CPU-seconds per sample (driver and workers),
  peak RSS of the driver and of the largest worker, files and commit groups, manifest bytes, and the
  time --resume takes to start extracting on the finished run (lock, fingerprint, groups read, skip
  list written).
- metadata: N synthetic commit groups (10 samples each) on local disk: select_groups, building and
  writing the manifest, a reader's open (the manifest's file list), and --resume's start; and the
  `_committed/` listing of 10^3 and 3x10^3 objects on gs:// (fake-gcs-server; its own listing scans
  every object per page, so 10^5 would take hours of the emulator's time): our client's CPU.
- tails: real / computed tokens of the web-text job's batching when its samples arrive on the
  batching keys of 64 workers x 12 threads (BatchPlan.batch_keys: each key's full batches, the
  rests gathered per shape), against one key; and with each key flushing its own rest
  (BatchPlan.batch_all per key, as on the BundleBasedDirectRunner).

Targets from issue 27: per-sample CPU at the largest size within 1.2x of the smallest; peak RSS
within 1.2x of the size before (plus output buffers); --resume ready within 10 s; metadata linear
or better. The README extrapolates to 10^8 samples from the measured slopes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import Figure

ROOT = Path(__file__).resolve().parent.parent
WORDS = "river valley stone water flood sea hill sand wind rain".split()
SIM_WIDTH = 64  # the embedded tiny model's d_model
# Every Python process of the job (driver and SDK workers) runs this at start-up: the forward
# becomes the simulated device's (no compute).
SITECUSTOMIZE = f"""
import beam_extract.extract as extract
from benchmarks.simulated import SimulatedModel
extract.load_model = lambda *args: SimulatedModel(width={SIM_WIDTH})
"""
JOB = """
import json, resource, sys, time
from beam_extract.pipeline import run
wall = time.perf_counter()
run(sys.argv[1:])
me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": time.perf_counter() - wall, "driver_cpu": me.ru_utime + me.ru_stime,
                  "workers_cpu": workers.ru_utime + workers.ru_stime, "driver_rss_mib": me.ru_maxrss / 1024,
                  "worker_rss_mib": workers.ru_maxrss / 1024}))
"""


def write_documents(directory: Path, samples: int, files: int) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    per_file = -(-samples // files)
    for index in range(files):
        count = min(per_file, samples - index * per_file)
        lengths = rng.integers(3, 13, count)
        with open(directory / f"part-{index:05d}.jsonl", "w") as handle:
            handle.writelines(json.dumps({"text": " ".join(rng.choice(WORDS, n))}) + "\n" for n in lengths)


def run_job(args: list[str], simulated: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(simulated), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", JOB, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def resume_start(args: list[str]) -> float:
    """Seconds from the driver's start of a --resume to the graph being ready: lock, fingerprint
    check, reading the groups and writing the skip list (the model's checksum aside)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_extract.job import claim_output, make_job
    from beam_extract.sink.ownership import release_lock

    job = make_job(PipelineOptions([*args, "--resume"]))
    start = time.perf_counter()
    claimed = claim_output(job)
    seconds = time.perf_counter() - start
    release_lock(claimed.output, claimed.lock)
    return seconds


def one_size(tmp: Path, samples: int, files: int, simulated: Path) -> dict:
    name = f"n{samples}-f{files}"
    write_documents(tmp / name, samples, files)
    output = tmp / f"{name}.out"
    args = [f"--input={tmp / name}/*.jsonl", f"--output={output}", "--input_format=text", "--layers=0",
            "--sites=resid_post", "--output_dtype=bfloat16", "--max_seq_len=64", "--shard_size_mb=64"]
    job = run_job([*args, "--direct_num_workers=2", "--direct_running_mode=multi_processing"], simulated)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["ok"] and manifest["counts"]["samples_committed"] == samples, manifest["problems"]
    hook = next(iter(manifest["hooks"].values()))
    result = {**job, "samples": samples, "input_files": files, "cpu": job["driver_cpu"] + job["workers_cpu"],
              "files_per_hook": len(hook["files"]), "groups": len(list((output / "_committed").glob("*.json"))),
              "manifest_bytes": (output / "manifest.json").stat().st_size,
              "resume_start_seconds": resume_start(args)}
    subprocess.run(["rm", "-rf", str(output), str(tmp / name)], check=True)
    return result


def synthetic_groups(template: dict, count: int, per_group: int = 10) -> list[dict]:
    """`count` commit groups shaped like `template` (a real one), each with its own id, samples and
    files."""
    groups = []
    for index in range(count):
        name = f"{index:012x}-{'0' * 12}"
        hooks = {hook: {**part, "files": [f.rsplit("/", 1)[0] + f"/part-{name}.tfrecord" for f in part["files"]]}
                 for hook, part in template["hooks"].items()}
        groups.append({**template, "group": name, "hooks": hooks,
                       "samples": [f"in/doc.jsonl:{index * per_group + i}#w0" for i in range(per_group)],
                       "digests": ["0" * 16] * per_group})
    return groups


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def metadata(tmp: Path, run_args: list[str], output: Path, count: int) -> dict:
    """The output's metadata with `count` commit groups added to a finished run's output."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_extract.accounting.invariants import RunTotals
    from beam_extract.accounting.totals import group_summary
    from beam_extract.format.commits import read_groups_on_disk, select_groups
    from beam_extract.format.layout import read_manifest
    from beam_extract.job import make_job
    from beam_extract.readers.reader import hook_files
    from beam_extract.sink.manifest import build_manifest, write_manifest

    template_path = sorted((output / "_committed").glob("*.json"))[0]
    existing = len(list((output / "_committed").glob("*.json")))
    groups = synthetic_groups(json.loads(template_path.read_text()), count)
    for group in groups:
        (output / "_committed" / f"{group['group']}.json").write_text(json.dumps(group, indent=1))
    on_disk, read_seconds = timed(read_groups_on_disk, str(output))
    (kept, _), select_seconds = timed(select_groups, on_disk)
    before = read_manifest(str(output))
    job = make_job(PipelineOptions(run_args))
    build_args = dict(
        options=job.options, config=job.config, hooks=job.hooks, groups=[group_summary(g) for g in kept],
        totals=RunTotals(lines_read=before["counts"]["lines_read"], batching=before["batching"],
                         committed_ids={"total": 10 * count, "distinct": 10 * count}),
        weights_sha256="", run_id=job.run_id)
    manifest, build_seconds = timed(lambda: build_manifest(**build_args))
    _, write_seconds = timed(write_manifest, str(output), manifest)
    hook = next(iter(manifest["hooks"]))
    files, open_seconds = timed(hook_files, str(output), hook)
    resume_seconds = resume_start(run_args)
    assert len(files) == count + existing, (len(files), count, existing)
    return {"groups": count, "read_groups_seconds": read_seconds, "select_groups_seconds": select_seconds,
            "manifest_build_seconds": build_seconds, "manifest_write_seconds": write_seconds,
            "manifest_bytes": (output / "manifest.json").stat().st_size, "reader_open_seconds": open_seconds,
            "resume_start_seconds": resume_seconds}


def gcs_listing(tmp: Path, count: int) -> dict:
    """Listing `count` commit records under gs://bucket/out/_committed/ on fake-gcs-server (loaded
    from a directory at start, so the upload is not timed)."""
    import shutil
    import socket

    from beam_extract.format.storage import list_paths

    data = tmp / f"gcs-{count}"
    commits = data / "bucket" / "out" / "_committed"
    commits.mkdir(parents=True)
    for index in range(count):
        (commits / f"{index:012x}-{'0' * 12}.json").write_text("{}")
    binary = str(Path(sys.executable).parent / "fake-gcs-server") if (
        Path(sys.executable).parent / "fake-gcs-server").exists() else shutil.which("fake-gcs-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([binary, "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port",
                               str(port), "-public-host", f"127.0.0.1:{port}", "-data", str(data), "-log-level",
                               "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = {name: os.environ.get(name) for name in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK")}
    os.environ.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", NO_GCE_CHECK="true")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "fake-gcs-server did not start"
                time.sleep(0.2)
        cpu = time.process_time()
        paths, seconds = timed(list_paths, "gs://bucket/out/_committed/*.json")
        assert len(paths) == count, len(paths)
        return {"objects": count, "list_seconds": seconds, "client_cpu_seconds": time.process_time() - cpu,
                "requests": -(-count // 1000)}  # the JSON API's pages of 1,000 names
    finally:
        server.terminate()
        server.wait(timeout=30)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(data)


def tails(quick: bool) -> dict:
    """Real / computed tokens of the web-text job's batching (host.py's whole-host-path input)
    when its samples arrive round-robin on 64 x 12 batching keys, against one key."""
    from beam_extract.batching import BatchPlan, parse_buckets
    from beam_extract.options import BY_NAME
    from beam_extract.tokenize import Sample

    rng = np.random.default_rng(0)
    docs = 3000 if quick else 30000
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, docs).astype(int), 20, 20000)
    samples = [Sample(f"doc{i}#w{w}", np.zeros(min(2048, n - w * 2048), np.int32), "web.jsonl", i + 1)
               for i, n in enumerate(lengths) for w in range(-(-n // 2048))]
    plan = BatchPlan(parse_buckets(BY_NAME["buckets"].default, 2048), 8, 0, "text", 2048)

    def fill(batches: list) -> float:
        return sum(b.real_tokens for b in batches) / sum(b.tokens.size for b in batches)

    def each_key_flushes(keys: int) -> float:  # the runners without gathered tails (BundleBasedDirectRunner)
        return fill([b for k in range(keys) for b in plan.batch_all(samples[k::keys])])

    return {"documents": docs, "samples": len(samples), "tokens": int(sum(len(s.token_ids) for s in samples)),
            "one_key": fill(plan.batch_all(samples)),
            "keys_64x12": fill(plan.batch_keys([samples[k::64 * 12] for k in range(64 * 12)])),
            "keys_64x12_own_tails": each_key_flushes(64 * 12), "keys_64_own_tails": each_key_flushes(64)}


def _ratio(raw: list[dict], key: str, per: str | None = None) -> float:
    """The largest size's figure over the smallest's (per unit of `per` if given)."""
    first, last = raw[0], raw[-1]
    scale = (last[per] / first[per]) if per else 1.0
    return last[key] / first[key] / scale


def collect(quick: bool) -> dict:
    sizes = [1000, 10_000] if quick else [10_000, 100_000]
    if int(os.environ.get("BENCH_SCALE_MAX", 0)) >= 1_000_000:
        sizes.append(1_000_000)
    many_files = 100 if quick else 1000
    group_counts = [1000, 10_000] if quick else [10_000, 100_000]
    # fake-gcs-server scans every object for each page of a listing (16 s for 3,000 objects, 99 s
    # for 10,000 here, or a timed-out page): 10^5 would take hours, of the emulator's time, not ours
    listed = [300, 1000] if quick else [1000, 3000]
    raw: dict = {"jobs": [], "metadata": [], "gcs_listing": []}
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        simulated = tmp / "simulated"
        simulated.mkdir()
        (simulated / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for samples in sizes:
            raw["jobs"].append(one_size(tmp, samples, 1, simulated))
            print(json.dumps(raw["jobs"][-1]), flush=True)
        raw["jobs_many_files"] = one_size(tmp, sizes[-1], many_files, simulated)
        print(json.dumps(raw["jobs_many_files"]), flush=True)
        base = tmp / "base"
        write_documents(base, 100, 1)
        base_args = [f"--input={base}/*.jsonl", f"--output={tmp}/base.out", "--input_format=text", "--layers=0",
                     "--sites=resid_post", "--max_seq_len=64"]
        run_job(base_args, simulated)
        for count in group_counts:
            copy = tmp / f"meta-{count}"
            subprocess.run(["cp", "-r", f"{tmp}/base.out", str(copy)], check=True)
            args = [a if not a.startswith("--output=") else f"--output={copy}" for a in base_args]
            raw["metadata"].append(metadata(tmp, args, copy, count))
            print(json.dumps(raw["metadata"][-1]), flush=True)
            subprocess.run(["rm", "-rf", str(copy)], check=True)
        for count in listed:
            raw["gcs_listing"].append(gcs_listing(tmp, count))
            print(json.dumps(raw["gcs_listing"][-1]), flush=True)
    raw["tails"] = tails(quick)
    return raw


def measure(quick: bool) -> tuple[list[Figure], dict]:
    raw = collect(quick)
    return figures(raw), raw


def figures(raw: dict) -> list[Figure]:
    jobs, meta, listing, tail = raw["jobs"], raw["metadata"], raw["gcs_listing"], raw["tails"]
    small, large = jobs[0], jobs[-1]
    many = raw["jobs_many_files"]
    n = f"{small['samples']:,} -> {large['samples']:,} samples"
    cpus, walls = ", ".join(f"{j['cpu']:.0f}" for j in jobs), ", ".join(f"{j['wall']:.0f}" for j in jobs)
    marginal = (large["cpu"] - small["cpu"]) / (large["samples"] - small["samples"])
    found = [
        Figure("scale", f"CPU-s per sample, {n} (one file; driver + 2 workers, simulated device)",
               " -> ".join(f"{j['cpu'] / j['samples'] * 1e3:.2f} ms" for j in jobs)
               + f" ({cpus} CPU-s, wall {walls} s; marginal {marginal * 1e3:.2f} ms per sample;"
               f" {many['input_files']} files at {many['samples']:,}: {many['cpu'] / many['samples'] * 1e3:.2f} ms)",
               _ratio(jobs, "cpu", "samples"), "<= 1.2"),
        # Peak RSS: the largest size against the one before it (issue 27: 10^6 within 1.2x of 10^5).
        Figure("scale", f"driver peak RSS, {n} (the in-process runner keeps PCollections between stages here)",
               " -> ".join(f"{j['driver_rss_mib']:.0f}" for j in jobs) + " MiB",
               _ratio(jobs[-2:], "driver_rss_mib"), "<= 1.2"),
        Figure("scale", f"worker peak RSS (largest of 2), {n}",
               " -> ".join(f"{j['worker_rss_mib']:.0f}" for j in jobs) + " MiB", _ratio(jobs[-2:], "worker_rss_mib"),
               "<= 1.2"),
        Figure("scale", f"files per hook, commit groups, manifest bytes, {n}",
               "; ".join(f"{j['files_per_hook']} files, {j['groups']} groups, {j['manifest_bytes']:,} B" for j in jobs)
               + f"; {many['input_files']} input files: {many['files_per_hook']} files, {many['groups']} groups, "
               f"{many['manifest_bytes']:,} B"),
        Figure("scale", f"--resume: time to start extracting on the finished run of {large['samples']:,} samples",
               f"{large['resume_start_seconds']:.2f} s (at {small['samples']:,}: "
               f"{small['resume_start_seconds']:.2f} s)", large["resume_start_seconds"], "< 10"),
    ]
    for key, what in (("read_groups_seconds", "reading the commit records"), ("select_groups_seconds", "select_groups"),
                      ("manifest_build_seconds", "building the manifest"),
                      ("manifest_write_seconds", "writing the manifest"), ("manifest_bytes", "manifest bytes"),
                      ("reader_open_seconds", "a reader's open (hook_files)"),
                      ("resume_start_seconds", "--resume's start (10 samples a group)")):
        unit = "B" if key == "manifest_bytes" else "s"
        found.append(Figure(
            "scale", f"{what} at {meta[0]['groups']:,} -> {meta[-1]['groups']:,} commit groups (per group, ratio)",
            " -> ".join(f"{m[key]:,.3g} {unit}" for m in meta), _ratio(meta, key, "groups"), "<= 1.5"))
    found.append(Figure(
        "scale", f"gs:// _committed/ listing, {listing[0]['objects']:,} -> {listing[-1]['objects']:,} objects "
                 "(fake-gcs-server), our client's CPU per object, ratio",
        " -> ".join(f"{g['list_seconds']:.1f} s wall, {g['client_cpu_seconds']:.2f} CPU-s, {g['requests']} requests"
                    for g in listing) + " (the wall time is the emulator's: it scans every object per page)",
        _ratio(listing, "client_cpu_seconds", "objects"), "<= 1.5"))
    found.append(Figure(
        "scale", "end-of-input tails: real/computed tokens on 64 workers x 12 threads' keys vs one key",
        f"{tail['keys_64x12']:.3f} vs {tail['one_key']:.3f} ({tail['samples']:,} web-text samples, "
        f"{tail['tokens']:,} tokens; rests gathered into one tail key per shape; each key flushing its own, "
        f"as on the BundleBasedDirectRunner: {tail['keys_64x12_own_tails']:.3f}, 64 keys "
        f"{tail['keys_64_own_tails']:.3f})", tail["keys_64x12"] / tail["one_key"],
        ">= 0.9"))
    return found
