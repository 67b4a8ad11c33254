"""The activation record: one tf.train.Example per (stored sequence, hook). README documents it."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np

from beam_extract.output.example_proto import decode_example, encode_example

# Little-endian storage dtypes for `activations`.
OUTPUT_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}

# name -> (tf.train.Feature kind, per-record shape: "scalar" or "list", meaning)
FEATURES: dict[str, tuple[str, str, str]] = {
    "activations": ("bytes", "scalar", "little-endian [n_tokens, d_model] array in `dtype`"),
    "token_ids": ("int64", "list", "token id of each stored token"),
    "positions": ("int64", "list", "position of each stored token in its sequence (0-based)"),
    "n_tokens": ("int64", "scalar", "number of stored tokens"),
    "d_model": ("int64", "scalar", "activation width"),
    "layer": ("int64", "scalar", "0-based layer index"),
    "hook_name": ("bytes", "scalar", "blocks.{layer}.hook_{site}"),
    "dtype": ("bytes", "scalar", "bfloat16 | float16 | float32"),
    "sample_id": ("bytes", "scalar", "unique, deterministic id of the sequence: text {file}:{line}#w{window}, "
                                     "ARC {task_id}/v{view}/t{test}"),
    "source": ("bytes", "scalar", "input file and line the sequence came from"),
    "task_id": ("bytes", "scalar", "ARC task id (empty for text)"),
    "doc_id": ("bytes", "scalar", "text: the document's own id field (empty if it had none, and for ARC)"),
    "augmentation": ("bytes", "scalar", "JSON of the ARC view's parameters (empty for text)"),
}


def encode_record(*, sample_id: str, hook_name: str, layer: int, activations: np.ndarray,
                  token_ids: np.ndarray, positions: np.ndarray, output_dtype: str, source: str,
                  task_id: str = "", doc_id: str = "", augmentation: str = "") -> bytes:
    """activations: [n_tokens, d_model] (any float dtype; stored as `output_dtype`)."""
    n_tokens, d_model = activations.shape
    return encode_example({
        "activations": np.ascontiguousarray(activations, dtype=OUTPUT_DTYPES[output_dtype]).tobytes(),
        "token_ids": [int(t) for t in token_ids],
        "positions": [int(p) for p in positions],
        "n_tokens": n_tokens,
        "d_model": d_model,
        "layer": layer,
        "hook_name": hook_name,
        "dtype": output_dtype,
        "sample_id": sample_id,
        "source": source,
        "task_id": task_id,
        "doc_id": doc_id,
        "augmentation": augmentation,
    })


def decode_record(data: bytes) -> dict:
    """A record as Python values, with `activations` as a float32 numpy array [n_tokens, d_model]."""
    raw = decode_example(data)
    record = {}
    for name, (kind, shape, _) in FEATURES.items():
        values = raw.get(name, [])
        if kind == "bytes":
            values = [v.decode("utf-8") if name != "activations" else v for v in values]
        record[name] = values[0] if shape == "scalar" else np.asarray(values, np.int64)
    dtype = OUTPUT_DTYPES[record["dtype"]]
    record["activations"] = (
        np.frombuffer(record["activations"], dtype).reshape(record["n_tokens"], record["d_model"]).astype(np.float32)
    )
    if record["augmentation"]:
        record["augmentation"] = json.loads(record["augmentation"])
    return record


def tf_feature_spec() -> dict:
    """The parse spec for `tf.io.parse_single_example` (imports TensorFlow)."""
    import tensorflow as tf

    kinds = {"bytes": tf.string, "int64": tf.int64}
    return {
        name: tf.io.FixedLenFeature([], kinds[kind]) if shape == "scalar" else tf.io.VarLenFeature(kinds[kind])
        for name, (kind, shape, _) in FEATURES.items()
    }
