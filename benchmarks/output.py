"""Output cost: bytes written per stored token vs the raw activation bytes, the numpy reader's
tokens/s vs reading the same files' raw bytes, and token_batches' mixing vs the reader (at half the
data, and at a 1M-token buffer), for Qwen2.5-0.5B-width (d=896) bfloat16 records."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from beam_extract.format.schema import OUTPUT_DTYPES, encode_record
from beam_extract.format.tfrecord import write_record
from beam_extract.readers.reader import read_activations, token_batches
from benchmarks.report import Figure

D_MODEL = 896


def _large_buffer(quick: bool) -> dict:
    """token_batches with a 1M-token mixing buffer (the README's example) over twice as many tokens,
    against read_activations over the same file, interleaved, medians. The records repeat a few
    random ones: the cost is in the bytes, not in their values."""
    buffer, repeats = (1 << 18, 1) if quick else (1 << 20, 3)
    rng = np.random.default_rng(1)
    examples = [encode_record(sample_id=f"doc{i}#w0", hook_name="blocks.12.hook_resid_post", layer=12,
                              activations=rng.standard_normal((2048, D_MODEL), np.float32),
                              sequence_token_ids=rng.integers(0, 151643, 2048), positions=np.arange(2048),
                              output_dtype="bfloat16", source=f"data/web.jsonl:{i + 1}") for i in range(8)]
    records = 2 * buffer // 2048 + 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "h").mkdir()
        with open(tmp / "h/part.tfrecord", "wb") as handle:
            for i in range(records):
                write_record(handle, examples[i % len(examples)])
        (tmp / "manifest.json").write_text(json.dumps({"hooks": {"h": {"files": ["h/part.tfrecord"]}}}))
        return {"buffer": buffer, "repeats": repeats, **_mixing_vs_reading(tmp, buffer, repeats)}


def _mixing_vs_reading(output: Path, buffer: int, repeats: int) -> dict:
    """read_activations and token_batches over the same files, interleaved, median seconds."""
    reads, shuffles = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = sum(r["n_tokens"] for r in read_activations(str(output), "h"))
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        shuffled = sum(len(b) for b in token_batches(str(output), "h", batch_tokens=4096, shuffle_buffer=buffer))
        shuffles.append(time.perf_counter() - start)
    return {"tokens": tokens, "shuffled": shuffled, "reader_tok_s": tokens / float(np.median(reads)),
            "shuffled_tok_s": shuffled / float(np.median(shuffles))}


def measure(quick: bool) -> tuple[list[Figure], dict]:
    records = 100 if quick else 400
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(600), 1.0, records).astype(int), 20, 8192)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "h").mkdir()
        written = 0
        with open(tmp / "h/part.tfrecord", "wb") as handle:
            for i, n in enumerate(lengths):
                example = encode_record(
                    sample_id=f"doc{i}#w0", hook_name="blocks.12.hook_resid_post", layer=12,
                    activations=rng.standard_normal((n, D_MODEL), np.float32), sequence_token_ids=rng.integers(0, 151643, n),
                    positions=np.arange(n), output_dtype="bfloat16", source=f"data/web-00001.jsonl:{i + 1}")
                written += write_record(handle, example)
        raw_bytes = int(lengths.sum()) * D_MODEL * OUTPUT_DTYPES["bfloat16"].itemsize
        manifest = {"output_dtype": "bfloat16", "hooks": {"h": {"files": ["h/part.tfrecord"]}}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        (tmp / "h/part.tfrecord").read_bytes()  # both reads from the page cache
        start = time.perf_counter()
        file_bytes = len((tmp / "h/part.tfrecord").read_bytes())
        raw_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tokens = sum(r["n_tokens"] for r in read_activations(str(tmp), "h"))
        read_seconds = time.perf_counter() - start
        # Half the tokens: the buffer fills, then every token read replaces one drawn from it.
        buffer = tokens // 2
        half = _mixing_vs_reading(tmp, buffer, 1 if quick else 3)
    mib = 2**20
    large = _large_buffer(quick)
    raw = {"records": records, "tokens": tokens, "written_bytes": written, "raw_activation_bytes": raw_bytes,
           "reader_tok_s": tokens / read_seconds, "raw_read_mib_s": file_bytes / raw_seconds / mib,
           "token_batches_tok_s": half["shuffled_tok_s"], "large_buffer": large}
    return [
        Figure("output", f"token_batches at a {large['buffer']:,}-token buffer vs the numpy reader",
               f"{large['shuffled_tok_s']:,.0f} vs {large['reader_tok_s']:,.0f} tok/s over {large['tokens']:,} tokens "
               f"(d={D_MODEL} bf16; medians of {large['repeats']}, interleaved)",
               large['reader_tok_s'] / large['shuffled_tok_s'], "<= 2"),
        Figure("output", "bytes written per raw activation byte",
               f"{written / mib:.1f} MiB written for {raw_bytes / mib:.1f} MiB of bf16 activations ({tokens} tokens)",
               written / raw_bytes, "<= 1.02"),
        Figure("output", "numpy reader vs raw file read",
               f"{tokens / read_seconds:,.0f} tok/s ({file_bytes / read_seconds / mib:.0f} MiB/s, decoded to float32) "
               f"vs {file_bytes / raw_seconds / mib:.0f} MiB/s", raw_seconds / read_seconds, ""),
        Figure("output", "token_batches (shuffle buffer of half the tokens) vs the numpy reader",
               f"{half['shuffled_tok_s']:,.0f} vs {half['reader_tok_s']:,.0f} tok/s ({buffer:,}-token buffer; "
               f"{half['shuffled']} of {tokens} tokens in whole batches of 4096; medians of {1 if quick else 3}, "
               "interleaved)", half["reader_tok_s"] / half["shuffled_tok_s"], "<= 2"),
    ], raw
