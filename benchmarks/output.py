"""Output cost: bytes written per stored token vs the raw activation bytes, and the numpy reader's
tokens/s vs reading the same files' raw bytes, for Qwen2.5-0.5B-width (d=896) bfloat16 records.

    python -m benchmarks.output [--records 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from beam_extract.output.reader import read_activations
from beam_extract.output.schema import OUTPUT_DTYPES, encode_record
from beam_extract.output.tfrecord import write_record

D_MODEL = 896


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=400)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, args.records).astype(int), 20, 8192)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "h").mkdir()
        written = 0
        with open(tmp / "h/part.tfrecord", "wb") as handle:
            for i, n in enumerate(lengths):
                example = encode_record(
                    sample_id=f"doc{i}#w0", hook_name="blocks.12.hook_resid_post", layer=12,
                    activations=rng.standard_normal((n, D_MODEL), np.float32), token_ids=rng.integers(0, 151643, n),
                    positions=np.arange(n), output_dtype="bfloat16", source=f"data/web-00001.jsonl:{i + 1}")
                written += write_record(handle, example)
        raw = int(lengths.sum()) * D_MODEL * OUTPUT_DTYPES["bfloat16"].itemsize
        manifest = {"output_dtype": "bfloat16", "hooks": {"h": {"files": ["h/part.tfrecord"]}}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))

        start = time.perf_counter()
        raw_bytes = len((tmp / "h/part.tfrecord").read_bytes())
        raw_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tokens = sum(r["n_tokens"] for r in read_activations(str(tmp), "h"))
        read_seconds = time.perf_counter() - start
    print(f"{args.records} records, {lengths.sum()} tokens, d={D_MODEL} bfloat16: "
          f"{written / raw:.4f} bytes written per raw activation byte")
    print(f"numpy reader: {tokens / read_seconds:.0f} tokens/s ({raw_bytes / read_seconds / 2**20:.0f} MiB/s, decoded to "
          f"float32) vs raw file read {raw_bytes / raw_seconds / 2**20:.0f} MiB/s: "
          f"{raw_seconds / read_seconds:.2f} of raw speed")


if __name__ == "__main__":
    main()
