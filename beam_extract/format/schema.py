"""The activation record: one tf.train.Example per (stored sequence, hook). README documents it."""

from __future__ import annotations

import dataclasses
import json

import ml_dtypes
import numpy as np

from beam_extract.format import wire
from beam_extract.format.example_proto import decode_example

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
    "d_model": ("int64", "scalar", "activation width: the hook's (d_model, n_heads * d_head for attn.hook_z, "
                                   "d_mlp for mlp.hook_post)"),
    "layer": ("int64", "scalar", "0-based layer index"),
    "hook_name": ("bytes", "scalar", "blocks.{layer}.hook_{site}, or TransformerLens's name of an inner site "
                                     "(blocks.{layer}.ln2.hook_normalized, .attn.hook_z, .mlp.hook_post)"),
    "dtype": ("bytes", "scalar", "bfloat16 | float16 | float32"),
    "sample_id": ("bytes", "scalar", "unique, deterministic id of the sequence: text {file}:{line}#w{window}, "
                                     "ARC {task_id}/v{view}/t{test}"),
    "source": ("bytes", "scalar", "input file and line the sequence came from"),
    "task_id": ("bytes", "scalar", "ARC task id (empty for text)"),
    "doc_id": ("bytes", "scalar", "text: the document's own id field (empty if it had none, and for ARC)"),
    "augmentation": ("bytes", "scalar", "JSON of the ARC view's parameters (empty for text)"),
    "sequence_token_ids": ("int64", "list", "token ids of the whole sequence as the model saw it, special tokens "
                                            "included; `positions` index into it (format 3 on; absent before)"),
}

ADDED_IN_FORMAT_3 = ("sequence_token_ids",)

# The features that differ between a sample's records at different hooks (the width differs between
# sites); all others are encoded once per sample. Records are assembled in sorted key order, as
# protobuf serialises a map: the width's entry, then the sample's between it and the hook's name.
WIDTH_FEATURE = "d_model"
HOOK_FEATURES = ("hook_name", "layer")
_KEYS = sorted(FEATURES)
_WIDTH_AT, _HOOK_AT = _KEYS.index(WIDTH_FEATURE), _KEYS.index(HOOK_FEATURES[0])
assert _KEYS[0] == "activations" and tuple(_KEYS[_HOOK_AT:_HOOK_AT + 2]) == HOOK_FEATURES and _WIDTH_AT < _HOOK_AT


@dataclasses.dataclass(frozen=True)
class SampleFields:
    """A sample's encoded features other than its activations and the hook's: the map entries that
    sort before the width, those between the width and the hook's name, and those after."""

    before: bytes
    between: bytes
    after: bytes


@dataclasses.dataclass(frozen=True)
class HookFields:
    """A hook's encoded features: its width's entry and its name's and layer's."""

    width: bytes
    name: bytes


def _entry(key: str, value) -> bytes:
    return wire.map_entry(key, wire.bytes_feature(value) if FEATURES[key][0] == "bytes" else wire.int64_feature(value))


def sample_fields(*, sequence_token_ids: np.ndarray, positions: np.ndarray, output_dtype: str,
                  sample_id: str, source: str, task_id: str = "", doc_id: str = "",
                  augmentation: str = "") -> SampleFields:
    """positions: of the stored tokens in the sequence (their token ids are taken from it)."""
    values = {"token_ids": np.asarray(sequence_token_ids)[positions], "positions": positions,
              "n_tokens": len(positions), "dtype": output_dtype, "sample_id": sample_id,
              "source": source, "task_id": task_id, "doc_id": doc_id, "augmentation": augmentation,
              "sequence_token_ids": sequence_token_ids}
    parts = (_KEYS[1:_WIDTH_AT], _KEYS[_WIDTH_AT + 1:_HOOK_AT], _KEYS[_HOOK_AT + len(HOOK_FEATURES):])
    return SampleFields(*(b"".join(_entry(key, values[key]) for key in keys) for keys in parts))


def hook_fields(hook_name: str, layer: int, width: int) -> HookFields:
    return HookFields(_entry(WIDTH_FEATURE, width), _entry("hook_name", hook_name) + _entry("layer", layer))


def _fields_size(sample: SampleFields, hook: HookFields) -> int:
    return len(sample.before) + len(hook.width) + len(sample.between) + len(hook.name) + len(sample.after)


def _head(n: int, sample: SampleFields, hook: HookFields) -> bytes:
    """A record's bytes up to its activations' n bytes (the Example, its map and the entry's heads)."""
    bytes_list = 1 + len(wire.varint(n)) + n
    feature = 1 + len(wire.varint(bytes_list)) + bytes_list
    key = wire.delimited(1, b"activations")
    entry = len(key) + 1 + len(wire.varint(feature)) + feature
    features = 1 + len(wire.varint(entry)) + entry + _fields_size(sample, hook)
    return (wire.field_head(1, features) + wire.field_head(1, entry) + key + wire.field_head(2, feature)
            + wire.field_head(1, bytes_list) + wire.field_head(1, n))


def record_parts(activations: memoryview, sample: SampleFields, hook: HookFields) -> list:
    """One record's bytes as parts to join; `activations` is the buffer of its little-endian
    [n_tokens, width] array in the output dtype, used as is."""
    return [_head(activations.nbytes, sample, hook), activations, sample.before, hook.width, sample.between,
            hook.name, sample.after]


def record_size(activation_bytes: int, sample: SampleFields, hook: HookFields) -> int:
    """The bytes of the record `record_parts` would make, without its activations at hand."""
    return len(_head(activation_bytes, sample, hook)) + activation_bytes + _fields_size(sample, hook)


def activation_bytes(activations: np.ndarray, output_dtype: str) -> memoryview:
    """The buffer of activations as stored: little-endian, C order, in the output dtype (a view when
    they are so already)."""
    stored = np.ascontiguousarray(activations, dtype=OUTPUT_DTYPES[output_dtype])
    if not stored.size:
        return memoryview(b"")  # a view with a zero in its shape cannot be cast
    return memoryview(stored.view(np.uint8)).cast("B")


def encode_record(*, sample_id: str, hook_name: str, layer: int, activations: np.ndarray,
                  sequence_token_ids: np.ndarray, positions: np.ndarray, output_dtype: str, source: str,
                  task_id: str = "", doc_id: str = "", augmentation: str = "") -> bytes:
    """One record's bytes; activations: [n_tokens, d_model] (any float dtype; stored as `output_dtype`)
    of the tokens at `positions` of the sequence."""
    if len(positions) != len(activations):
        raise ValueError(f"{len(positions)} positions for {len(activations)} rows of activations")
    fields = sample_fields(sequence_token_ids=sequence_token_ids, positions=positions, output_dtype=output_dtype,
                           sample_id=sample_id, source=source, task_id=task_id, doc_id=doc_id,
                           augmentation=augmentation)
    return b"".join(record_parts(activation_bytes(activations, output_dtype), fields,
                                 hook_fields(hook_name, layer, activations.shape[1])))


def decode_record(data: bytes) -> dict:
    """A record as Python values, with `activations` as a float32 numpy array [n_tokens, d_model].
    `sequence_token_ids` is None in records written before format 3."""
    raw = decode_example(data)
    record = {}
    for name, (kind, shape, _) in FEATURES.items():
        if name not in raw and name in ADDED_IN_FORMAT_3:
            record[name] = None
            continue
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
