"""What a worker start costs: each fresh process imports JAX and the model code, loads the weights
onto its devices and compiles (or, with the persistent compilation cache, loads) one forward per
batch shape. Measured in new processes, as a runner starts workers: with an empty cache, again
with the cache the first filled (a repeated start, the default since a local cache is on for
every worker), and with the cache off.

    python -m benchmarks.worker_start [--model DIR] [--shapes 8x256,8x512,8x1024]

Without --model: random weights of the Qwen2.5-0.5B architecture (float32), all 24 layers' resid_post.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_WORKER = """
import json, resource, sys, time
began = time.perf_counter()
import numpy as np
from beam_extract.model import compile_cache
from beam_extract.model.loaded import load_model
from beam_extract.hooks import parse_hook_name
imported = time.perf_counter()
model_dir, cache, shapes, dtype = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
if cache != "none":
    compile_cache.enable_compilation_cache(cache)
model = load_model(model_dir, dtype)
import jax
jax.block_until_ready(model.params)
loaded = time.perf_counter()
n = model.config.num_layers
hooks = tuple(parse_hook_name(f"blocks.{layer}.hook_resid_post", n) for layer in range(n))
compiles = [model.compiled(tuple(shape), hooks, np.dtype("float32"))[1] for shape in shapes]
print(json.dumps({"import_s": imported - began, "load_s": loaded - imported, "compile_s": compiles,
                  "cache_hits": model.cache_hits, "total_s": time.perf_counter() - began,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def start(model_dir: str, cache: str, shapes: list[list[int]], dtype: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _WORKER, model_dir, cache, json.dumps(shapes), dtype],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="")
    parser.add_argument("--shapes", default="8x256,8x512,8x1024")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    shapes = [[int(n) for n in shape.split("x")] for shape in args.shapes.split(",")]
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model
        if not model_dir:
            import transformers

            from beam_extract.model.embedded import write_random_checkpoint
            from benchmarks.forward import QWEN25_05B

            model_dir = str(Path(work) / "model")
            write_random_checkpoint(Path(model_dir), transformers.Qwen2Config(**QWEN25_05B), seed=0)
        cache = str(Path(work) / "cache")
        runs = {"cold cache": start(model_dir, cache, shapes, args.dtype),
                "warm cache (a repeated start)": start(model_dir, cache, shapes, args.dtype),
                "cache off": start(model_dir, "none", shapes, args.dtype)}
    for name, run in runs.items():
        print(f"{name}: {run['total_s']:.1f} s = import {run['import_s']:.1f} + load {run['load_s']:.1f} + "
              f"{len(shapes)} forwards {sum(run['compile_s']):.1f} ({', '.join(f'{s:.1f}' for s in run['compile_s'])}; "
              f"{run['cache_hits']} from the cache); peak RSS {run['peak_rss_gib']:.2f} GiB")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
