"""Reading activations back: by output directory and hook (local or gs://), through the manifest
(or the commits, for a run still going: an interrupted or a streaming one). Imports neither Beam,
JAX, transformers, PyTorch nor TensorFlow: a training process that reads the output loads none of
them (installing the package still installs them: they are its dependencies).

- `read_activations(path, hook)`: records as dicts with numpy arrays.
- `tf_dataset(path, hook)`: a tf.data.Dataset of parsed records (imports TensorFlow when called).
- `token_batches(path, hook, batch_tokens, shuffle_buffer, seed)`: shuffled float32
  [batch_tokens, d_model] arrays of single tokens, for SAE training; with `hooks=[...]` the same
  tokens at several hooks, shuffled together (transcoders, crosscoders).
- `read_windows(path)`: a streaming job's progress, one index per closed time window.
- `write_snapshot(path, snapshot)`: the files of a run still going, listed once into a file whose
  path every reader above (and every rank of `ActivationDataset`) then takes in place of `path`, so
  that they all read the same files.

Reading a run that is not finished (no manifest), whose manifest says `ok: false`, or whose commits
overlap, warns with an `IncompleteRunWarning` naming why (`warnings.simplefilter("error",
IncompleteRunWarning)` makes it refuse).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import posixpath
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from beam_extract.format.commits import read_groups_on_disk, select_groups
from beam_extract.format.layout import MANIFEST_NAME, WINDOWS, read_manifest
from beam_extract.format.schema import OUTPUT_DTYPES, decode_record, tf_feature_spec
from beam_extract.format.storage import exists, list_paths, read_json, write_bytes
from beam_extract.format.tfrecord import iter_tfrecord
from beam_extract.readers.mixing import mixed_batches


class IncompleteRunWarning(UserWarning):
    """The output read is not a finished run whose manifest says ok: what is read may change, or miss
    or repeat samples, as the warning says."""


SNAPSHOT_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """The files readers of an output read, per hook (relative to `output`), and what they come from:
    the manifest of a finished run, the commits of a run still going, or a snapshot of either."""

    output: str
    source: str  # "manifest", "commits" or "snapshot"
    hooks: dict[str, list[str]]
    complete: bool  # a finished run's manifest: the files will not change
    problems: tuple[str, ...]  # why reading this may not give every sample of a finished, ok run once

    @property
    def fixed(self) -> bool:
        """Whether every reader that plans over this output now or later gets these very files."""
        return self.complete or self.source == "snapshot"

    def files(self, hook: str) -> list[str]:
        if hook not in self.hooks and not self.complete:
            return []  # a run still going may not have committed the hook yet
        if hook not in self.hooks:
            raise KeyError(f"{self.output} has no hook {hook!r}; it has {', '.join(self.hooks) or 'none yet'}")
        return [f"{self.output}/{f}" for f in self.hooks[hook]]

    def digest(self, hooks: Sequence[str]) -> str:
        """Equal for two plans exactly when they read the same files of `hooks` in the same order."""
        return hashlib.sha256(json.dumps([self.output, [self.files(h) for h in hooks]]).encode()).hexdigest()[:16]

    def warn(self, stacklevel: int = 3) -> None:
        if self.problems:
            warnings.warn(f"{self.output}: " + "; ".join(self.problems), IncompleteRunWarning, stacklevel=stacklevel)


def read_plan(path: str) -> Plan:
    """The plan of the output directory `path`, or the one a snapshot file at `path` holds."""
    path = _spelled_once(path)
    if path.endswith(".json"):  # a snapshot (an output is a directory)
        snapshot = read_json(path)
        if snapshot.get("snapshot_format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is a file but not a snapshot of an output (see write_snapshot)")
        return Plan(snapshot["output"], "snapshot", snapshot["hooks"], snapshot["complete"],
                    tuple(snapshot["problems"]))
    if exists(f"{path}/{MANIFEST_NAME}"):
        manifest = read_manifest(path)
        problems = () if manifest.get("ok", True) else (
            "its manifest says ok: false (" + "; ".join(manifest.get("problems", [])) + ")",)
        return Plan(path, "manifest", {hook: part["files"] for hook, part in manifest["hooks"].items()}, True, problems)
    # A run still going (or killed) may have groups of failed attempts beside their retries'.
    selection = select_groups(read_groups_on_disk(path))
    hooks: dict[str, list[str]] = {}
    for group in selection.readable:
        for hook, part in group["hooks"].items():
            hooks.setdefault(hook, []).extend(part["files"])
    unfinished = (f"the run has no manifest (still going, or stopped before its end): the "
                  f"{len(selection.readable)} commit groups there now are read, and readers that list it at "
                  "another time may read other files (write_snapshot lists them once for all)")
    return Plan(path, "commits", {hook: sorted(files) for hook, files in sorted(hooks.items())}, False,
                (unfinished, *selection.problems))


def _spelled_once(path: str) -> str:
    """One spelling per directory (`out/`, `out//`, `./out` are `out`), so that ranks given the
    same output agree on their plans' digests."""
    if path.startswith("gs://"):
        return path.rstrip("/")
    return posixpath.normpath(path)


def write_snapshot(path: str, snapshot: str) -> Plan:
    """Lists the files of the output `path` once, into the file `snapshot` (local or gs://, a name
    ending in .json): readers
    given `snapshot` as their path read those files, whatever the run commits afterwards (they must
    not be removed meanwhile: no --overwrite, and no --resume of a killed run, until reading ends)."""
    if not snapshot.endswith(".json"):
        raise ValueError(f"a snapshot's name ends in .json (readers know it by that): {snapshot}")
    plan = read_plan(path)
    if _spelled_once(snapshot).startswith(plan.output + "/"):
        raise ValueError(f"{snapshot} is inside the output {plan.output}, which holds only what beam-extract "
                         "writes (a --resume would refuse it); write the snapshot elsewhere")
    write_bytes(snapshot, json.dumps({"snapshot_format": SNAPSHOT_FORMAT, "output": plan.output,
                                      "of": plan.source, "complete": plan.complete, "problems": plan.problems,
                                      "hooks": plan.hooks}, indent=1).encode())
    return plan


def hook_files(path: str, hook: str) -> list[str]:
    """The files of one hook: from the manifest of a finished run, else from the groups committed so
    far (an interrupted run's committed work is complete and readable), or as a snapshot lists them;
    warns (IncompleteRunWarning) when reading them may miss or repeat samples."""
    plan = read_plan(path)
    plan.warn(stacklevel=4)
    return plan.files(hook)


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


def _features(view: memoryview, names: tuple[bytes, ...]) -> dict[bytes, tuple[int, int]]:
    """Where the Feature message of each of `names` is in a serialized tf.train.Example."""
    found = {}
    for features in _spans(view, 0, len(view), 1):  # Example.features
        for entry in _spans(view, *features, 1):  # Features.feature: map entries (key 1, value 2)
            keys = _spans(view, *entry, 1)
            if keys and (key := bytes(view[slice(*keys[-1])])) in names:
                found[key] = _spans(view, *entry, 2)[-1]
    return found


def _activation_bytes(data: bytes) -> memoryview:
    """The `activations` value of a serialized tf.train.Example, without copying it or parsing the
    other features: protobuf's parser copies the whole record and decodes every token id list, which
    took 400 ns a token (d_model 896, bfloat16), more than the shuffling itself."""
    view = memoryview(data)
    feature = _features(view, (b"activations",)).get(b"activations")
    if feature is None:
        raise ValueError("a record has no activations")
    value = _spans(view, *_spans(view, *feature, 1)[-1], 1)[-1]  # Feature.bytes_list.value
    return view[slice(*value)]


class MisalignedHooks(ValueError):
    """Records read side by side from several hooks' files are not of the same tokens."""


_IDENTITY = (b"sample_id", b"positions")


def _identity(data: bytes) -> tuple[bytes, ...]:
    """The encoded sample id and positions of a record: equal at every hook of the same tokens."""
    view = memoryview(data)
    found = _features(view, _IDENTITY)
    return tuple(bytes(view[slice(*found[name])]) if name in found else b"" for name in _IDENTITY)


def aligned_records(files: Sequence[str]) -> Iterator[tuple[bytes, ...]]:
    """The records of one commit's files, one file per hook, side by side: each tuple holds the
    same sample's records (sample id and positions checked equal, not assumed), else
    MisalignedHooks."""
    if len(files) == 1:
        yield from ((data,) for data in iter_tfrecord(files[0]))
        return
    sentinel = object()
    for number, records in enumerate(itertools.zip_longest(*map(iter_tfrecord, files), fillvalue=sentinel)):
        if any(data is sentinel for data in records):
            raise MisalignedHooks(f"{', '.join(files)}: the files hold different numbers of records")
        first = _identity(records[0])
        for file, data in zip(files[1:], records[1:]):
            if _identity(data) != first:
                raise MisalignedHooks(f"record {number} of {file} is not the tokens of record {number} of {files[0]} "
                                      "(another sample id or other positions)")
        yield records


def joined_tokens(records: Iterable[tuple[bytes, ...]]) -> Iterator[np.ndarray]:
    """Each tuple of records' activations side by side, [n_tokens, sum of the widths], as stored (a
    view where there is one record, in the run's output dtype): dtype and widths come from the first
    tuple, as a run's records of a hook share them."""
    layouts = None
    for group in records:
        if layouts is None:
            layouts = [(OUTPUT_DTYPES[first["dtype"]], first["d_model"]) for first in map(decode_record, group)]
        arrays = [np.frombuffer(_activation_bytes(data), dtype).reshape(-1, width)
                  for data, (dtype, width) in zip(group, layouts)]
        yield arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)


def paired_files(plan: Plan, hooks: Sequence[str]) -> list[tuple[str, ...]]:
    """Per commit, the file of each of `hooks`: a commit writes one file per hook, with the same
    samples in the same order and the same name. Hooks whose files are not of the same commits
    (written by different runs, or an output put together from several) are refused."""
    if isinstance(hooks, str) or not hooks or len(set(hooks)) != len(hooks):
        raise ValueError(f"hooks must name distinct hooks, got {list(hooks)}")
    path, lists = plan.output, [plan.files(hook) for hook in hooks]
    names = [[file.rsplit("/", 1)[-1] for file in files] for files in lists]
    for hook, others in zip(hooks[1:], names[1:]):
        if others != names[0]:
            raise MisalignedHooks(f"{path}: {hook} and {hooks[0]} were not written by the same commits of one run "
                                  f"({len(set(others) ^ set(names[0]))} files differ); they cannot be read paired")
    return list(zip(*lists))


def hook_widths(files: tuple[str, ...]) -> list[int]:
    """The width of each file's records (from its first)."""
    return [decode_record(next(iter_tfrecord(file)))["d_model"] for file in files]


def per_hook(batches: Iterable[np.ndarray], widths: Sequence[int], stack: bool) -> Iterator:
    """Batches of hooks side by side [batch, sum of widths] -> a tuple of [batch, width] arrays, one per
    hook, or with `stack` one [batch, n_hooks, width] array (the widths must agree)."""
    if stack and len(set(widths)) > 1:
        raise ValueError(f"hooks of widths {list(widths)} cannot be stacked; read them as a tuple (stack=False)")
    ends = np.cumsum(widths)[:-1]
    return (batch.reshape(len(batch), len(widths), widths[0]) if stack else tuple(np.split(batch, ends, axis=1))
            for batch in batches)


def token_batches(path: str, hook: str | None = None, batch_tokens: int = 4096, shuffle_buffer: int = 65536,
                  seed: int = 0, epochs: int = 1, *, hooks: Sequence[str] | None = None,
                  stack: bool = False) -> Iterator:
    """Float32 [batch_tokens, d_model] batches of single tokens of `hook`, from files visited in a
    seeded random order through a mixing buffer of `shuffle_buffer` tokens (`mixing.mixed_batches`:
    O(batch) per batch). Every token is drawn once per epoch; a final partial batch is dropped.

    With `hooks` (instead of `hook`) each batch holds the same tokens at every hook, shuffled
    together: a tuple of [batch_tokens, width] arrays in the order of `hooks` (the widths may differ,
    e.g. mlp_in and mlp_post), or with `stack` one [batch_tokens, n_hooks, width] array. The hooks'
    files are read side by side and each record's sample id and positions checked equal
    (MisalignedHooks otherwise)."""
    if (hook is None) == (hooks is None):
        raise ValueError("give either hook or hooks")
    rng = np.random.default_rng(seed)
    plan = read_plan(path)
    plan.warn()
    files = paired_files(plan, [hook] if hooks is None else hooks)

    def records() -> Iterator[tuple[bytes, ...]]:
        for _ in range(epochs):
            for index in rng.permutation(len(files)):
                yield from aligned_records(files[index])

    batches = mixed_batches(joined_tokens(records()), batch_tokens, shuffle_buffer, rng)
    return batches if hooks is None else per_hook(batches, hook_widths(files[0]) if files else [0] * len(hooks), stack)


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
