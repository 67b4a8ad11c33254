"""Reading activations back: by output directory and hook (local or gs://), through the manifest
(or the commits, for a run still going: an interrupted or a streaming one). Imports neither Beam,
JAX, transformers, PyTorch nor TensorFlow: a training process that reads the output loads none of
them (installing the package still installs them: they are its dependencies).

- `read_activations(path, hook)`: records as dicts with numpy arrays.
- `tf_dataset(path, hook)`: a tf.data.Dataset of parsed records (imports TensorFlow when called).
- `token_batches(path, hook, batch_tokens, shuffle_buffer, seed)`: shuffled float32
  [batch_tokens, d_model] arrays of single tokens, for SAE training.
- `read_windows(path)`: a streaming job's progress, one index per closed time window.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from beam_extract.output.commits import read_groups_on_disk, select_groups
from beam_extract.output.mixing import mixed_batches
from beam_extract.output.layout import MANIFEST_NAME, WINDOWS, read_manifest
from beam_extract.output.schema import OUTPUT_DTYPES, decode_record, tf_feature_spec
from beam_extract.output.storage import exists, list_paths, read_json
from beam_extract.output.tfrecord import iter_tfrecord


def hook_files(path: str, hook: str) -> list[str]:
    """The files of one hook: from the manifest of a finished run, else from the groups committed so
    far (an interrupted run's committed work is complete and readable)."""
    path = path.rstrip("/")
    if exists(f"{path}/{MANIFEST_NAME}"):
        hooks = read_manifest(path)["hooks"]
        if hook not in hooks:
            raise KeyError(f"{path} has no hook {hook!r}; it has {', '.join(hooks)}")
        files = hooks[hook]["files"]
    else:
        # A run still going (or killed) may have groups of failed attempts beside their retries'.
        kept, _ = select_groups(read_groups_on_disk(path))
        files = sorted(f for group in kept for f in group["hooks"].get(hook, {}).get("files", []))
    return [f"{path}/{f}" for f in files]


def read_windows(path: str) -> list[dict]:
    """The indexes of a streaming job's closed windows (counts, per hook records, tokens and files,
    commits), oldest first."""
    return [read_json(p) for p in list_paths(f"{path.rstrip('/')}/{WINDOWS}/*.json")]


def _decoded(files: list[str]) -> Iterator[dict]:
    for file in files:
        for data in iter_tfrecord(file):
            yield decode_record(data)


def read_records(pattern: str) -> Iterator[dict]:
    """Every record of every file matching a glob, decoded (activations as float32 numpy)."""
    return _decoded(list_paths(pattern))


def read_activations(path: str, hook: str) -> Iterator[dict]:
    """Every record of `hook` under the output directory `path`, decoded."""
    return _decoded(hook_files(path, hook))


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if byte < 0x80:
            return value, at


def _spans(data: memoryview, start: int, end: int, number: int) -> list[tuple[int, int]]:
    """(start, end) of each length-delimited field `number` of the message in data[start:end];
    other fields are stepped over by their length, not parsed."""
    found, at = [], start
    while at < end:
        key, at = _varint(data, at)
        kind = key & 7
        if kind == 2:
            size, at = _varint(data, at)
            if key >> 3 == number:
                found.append((at, at + size))
            at += size
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
        elif kind == 0:
            _, at = _varint(data, at)
        else:
            raise ValueError(f"a record is not a tf.train.Example (protobuf wire type {kind})")
    return found


def _activation_bytes(data: bytes) -> memoryview:
    """The `activations` value of a serialized tf.train.Example, without copying it or parsing the
    other features: protobuf's parser copies the whole record and decodes every token id list, which
    took 400 ns a token (d_model 896, bfloat16), more than the shuffling itself."""
    view = memoryview(data)
    for features in _spans(view, 0, len(view), 1):  # Example.features
        for entry in _spans(view, *features, 1):  # Features.feature: map entries (key 1, value 2)
            keys = _spans(view, *entry, 1)
            if keys and view[slice(*keys[-1])] == b"activations":
                feature = _spans(view, *entry, 2)[-1]
                value = _spans(view, *_spans(view, *feature, 1)[-1], 1)[-1]  # Feature.bytes_list.value
                return view[slice(*value)]
    raise ValueError("a record has no activations")


def stored_tokens(records: Iterable[bytes]) -> Iterator[np.ndarray]:
    """Each serialized record's activations [n_tokens, d_model], as stored (a view, in the run's
    output dtype): the dtype and width come from the first record, as a run's records share them."""
    layout = None
    for data in records:
        if layout is None:
            first = decode_record(data)
            layout = OUTPUT_DTYPES[first["dtype"]], first["d_model"]
        yield np.frombuffer(_activation_bytes(data), layout[0]).reshape(-1, layout[1])


def token_batches(path: str, hook: str, batch_tokens: int, shuffle_buffer: int = 65536, seed: int = 0,
                  epochs: int = 1) -> Iterator[np.ndarray]:
    """Float32 [batch_tokens, d_model] batches of single tokens, from files visited in a seeded
    random order through a mixing buffer of `shuffle_buffer` tokens (`mixing.mixed_batches`: O(batch)
    per batch). Every token is drawn once per epoch; a final partial batch is dropped."""
    rng = np.random.default_rng(seed)
    files = hook_files(path, hook)

    def records() -> Iterator[bytes]:
        for _ in range(epochs):
            for index in rng.permutation(len(files)):
                yield from iter_tfrecord(files[index])

    return mixed_batches(stored_tokens(records()), batch_tokens, shuffle_buffer, rng)


def tf_dataset(path: str, hook: str):
    """A tf.data.Dataset of parsed records of `hook`; `activations` decoded to float32 [n_tokens, d_model]."""
    import tensorflow as tf

    spec = tf_feature_spec()
    files = hook_files(path, hook)
    # Records name their dtype; a run still going has no manifest to say it.
    dtype = decode_record(next(iter_tfrecord(files[0])))["dtype"] if files else "float32"
    stored = tf.dtypes.as_dtype(OUTPUT_DTYPES[dtype].name)

    def parse(serialized):
        record = tf.io.parse_single_example(serialized, spec)
        record = {k: tf.sparse.to_dense(v) if isinstance(v, tf.sparse.SparseTensor) else v for k, v in record.items()}
        values = tf.io.decode_raw(record["activations"], stored, little_endian=True)
        record["activations"] = tf.cast(tf.reshape(values, [record["n_tokens"], record["d_model"]]), tf.float32)
        return record

    return tf.data.TFRecordDataset(files).map(parse)
