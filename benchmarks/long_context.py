"""Peak memory and time of one B=1, S=8192 forward of the Qwen2.5-0.5B architecture (fp32, random
weights), resid_post of all 24 layers returned to the host.

    python -m benchmarks.long_context [--seq 8192]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers

from benchmarks.forward import QWEN25_05B
from beam_extract.model.loaded import load_model
from beam_extract.model.embedded import write_random_checkpoint


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(Path(directory), transformers.Qwen2Config(**QWEN25_05B), seed=0)
        model = load_model(directory)
    loaded = peak_rss_gib()
    ids = np.random.default_rng(0).integers(0, 151643, size=(1, args.seq))
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(24)]
    start = time.perf_counter()
    acts = model.run_with_cache(ids, hooks)
    seconds = time.perf_counter() - start
    output_gib = sum(a.nbytes for a in acts.values()) / 2**30
    print(f"B=1 S={args.seq}: {seconds:.1f} s ({args.seq / seconds:.0f} tok/s incl. compile); peak RSS "
          f"{peak_rss_gib():.2f} GiB (after loading weights {loaded:.2f} GiB; returned activations {output_gib:.2f} GiB)")


if __name__ == "__main__":
    main()
