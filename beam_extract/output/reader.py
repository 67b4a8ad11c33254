"""Reading activations back: by output directory and hook (local or gs://), through the manifest
(or the commits, for a run still going: an interrupted or a streaming one).

- `read_activations(path, hook)`: records as dicts with numpy arrays; never imports TensorFlow.
- `tf_dataset(path, hook)`: a tf.data.Dataset of parsed records.
- `token_batches(path, hook, batch_tokens, shuffle_buffer, seed)`: shuffled float32
  [batch_tokens, d_model] arrays of single tokens, for SAE training.
- `read_windows(path)`: a streaming job's progress, one index per closed time window.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_extract.output.manifest import MANIFEST_NAME, read_manifest
from beam_extract.output.schema import OUTPUT_DTYPES, decode_record, tf_feature_spec
from beam_extract.output.tfrecord import iter_tfrecord
from beam_extract.output.windows import WINDOWS
from beam_extract.output.commits import read_groups_on_disk, read_json, select_groups


def hook_files(path: str, hook: str) -> list[str]:
    """The files of one hook: from the manifest of a finished run, else from the groups committed so
    far (an interrupted run's committed work is complete and readable)."""
    path = path.rstrip("/")
    if FileSystems.exists(f"{path}/{MANIFEST_NAME}"):
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
    matches = FileSystems.match([f"{path.rstrip('/')}/{WINDOWS}/*.json"])[0].metadata_list
    return [read_json(m.path) for m in sorted(matches, key=lambda m: m.path)]


def _decoded(files: list[str]) -> Iterator[dict]:
    for file in files:
        for data in iter_tfrecord(file):
            yield decode_record(data)


def read_records(pattern: str) -> Iterator[dict]:
    """Every record of every file matching a glob, decoded (activations as float32 numpy)."""
    return _decoded(sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list))


def read_activations(path: str, hook: str) -> Iterator[dict]:
    """Every record of `hook` under the output directory `path`, decoded."""
    return _decoded(hook_files(path, hook))


def token_batches(path: str, hook: str, batch_tokens: int, shuffle_buffer: int = 65536, seed: int = 0,
                  epochs: int = 1) -> Iterator[np.ndarray]:
    """Float32 [batch_tokens, d_model] batches of single tokens, from files visited in a seeded
    random order through a shuffle buffer (as tf.data's): once `shuffle_buffer + batch_tokens`
    tokens are held, a batch is drawn uniformly from them and the tokens read next take its
    places. Each token is copied twice (into the buffer, out in its batch), so a batch costs
    O(batch_tokens) whatever the buffer's size. Every token is drawn once per epoch; a final
    partial batch is dropped."""
    rng = np.random.default_rng(seed)
    files = hook_files(path, hook)
    capacity = shuffle_buffer + batch_tokens
    pool, free = None, np.arange(capacity)  # free: the places not holding a token, filled first to last
    for _ in range(epochs):
        for index in rng.permutation(len(files)):
            for data in iter_tfrecord(files[index]):
                tokens = decode_record(data)["activations"]
                if pool is None:
                    pool = np.empty((capacity, tokens.shape[1]), np.float32)
                while len(tokens):
                    if not len(free):  # full: a batch leaves, its places take the next tokens
                        free = rng.choice(capacity, batch_tokens, replace=False, shuffle=False)
                        yield pool[free]
                    placed = min(len(tokens), len(free))
                    pool[free[:placed]] = tokens[:placed]
                    free, tokens = free[placed:], tokens[placed:]
    if pool is not None:
        held = np.setdiff1d(np.arange(capacity), free, assume_unique=True)
        order = held[rng.permutation(len(held))]
        for start in range(0, len(order) - batch_tokens + 1, batch_tokens):
            yield pool[order[start: start + batch_tokens]]


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
