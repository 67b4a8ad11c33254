"""Activation records -> TFRecord files per hook, committed per bundle so finished work survives a kill.

Layout: OUT/{site}/layer_{LL}/part-{commit}-{NNN}.tfrecord. A bundle writes its records to
temporary files beside them, renames them to their final names, then writes OUT/_committed/{commit}.json
listing its sample ids, files and statistics. The commit id is a hash of the bundle's sample ids,
so a retried bundle rewrites the same names; a killed one leaves only files no commit lists, which
the next run removes. Readers use the manifest (or the commits), never a directory listing.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_extract.model import hook_name
from beam_extract.model.qwen2 import Hook
from beam_extract.output.tfrecord import write_record

COMMITS = "_committed"
TEMPORARY_SUFFIX = ".tmp"  # temporary files are hidden (.name.tmp) and never match *.tfrecord


def hook_dir(output: str, hook: Hook) -> str:
    layer, site = hook
    return f"{output}/{site}/layer_{layer:02d}"


def write_json(path: str, value: dict) -> None:
    """Writes to a temporary name, then renames: readers never see a partial file."""
    directory, _, name = path.rpartition("/")
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
    with FileSystems.create(temporary) as handle:
        handle.write(json.dumps(value, indent=1).encode("utf-8"))
    FileSystems.rename([temporary], [path])


def read_json(path: str) -> dict:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def read_commits(output: str) -> list[dict]:
    matches = FileSystems.match([f"{output}/{COMMITS}/*.json"])[0].metadata_list
    return [read_json(m.path) for m in sorted(matches, key=lambda m: m.path)]


class WriteCommitted(beam.DoFn):
    """ActivationRecord -> files per hook, rolled over at `shard_bytes`; yields one commit id per
    bundle that wrote anything."""

    def __init__(self, output: str, hooks: tuple[Hook, ...], shard_bytes: int):
        self._output, self._hooks, self._shard_bytes = output, hooks, shard_bytes

    def start_bundle(self):
        self._open: dict[int, tuple] = {}  # hook index -> (handle, temporary path, bytes written)
        self._written: dict[int, list[str]] = {i: [] for i in range(len(self._hooks))}
        self._samples: set[str] = set()
        self._stats = {i: [0, 0, 0.0, 0.0] for i in range(len(self._hooks))}

    def process(self, record):
        handle, path, size = self._open.get(record.hook_index) or self._new_file(record.hook_index)
        size += write_record(handle, record.example)
        self._open[record.hook_index] = (handle, path, size)
        if size >= self._shard_bytes:
            handle.close()
            del self._open[record.hook_index]
        self._samples.add(record.sample_id)
        stats = self._stats[record.hook_index]
        stats[0] += 1
        stats[1] += record.n_tokens
        stats[2] += record.sum_l2_norm
        stats[3] += record.sum_squared_norm

    def _new_file(self, index: int) -> tuple:
        path = f"{hook_dir(self._output, self._hooks[index])}/.{uuid.uuid4().hex}.tfrecord{TEMPORARY_SUFFIX}"
        self._written[index].append(path)
        return FileSystems.create(path), path, 0

    def finish_bundle(self):
        for handle, _, _ in self._open.values():
            handle.close()
        if not self._samples:
            return
        commit = hashlib.sha256("\n".join(sorted(self._samples)).encode()).hexdigest()[:20]
        hooks = {}
        for index, hook in enumerate(self._hooks):
            finals = [f"{hook_dir(self._output, hook)}/part-{commit}-{n:03d}.tfrecord"
                      for n in range(len(self._written[index]))]
            if finals:
                FileSystems.rename(self._written[index], finals)
            records, tokens, sum_norm, sum_squared = self._stats[index]
            hooks[hook_name(*hook)] = {
                "files": [f.removeprefix(f"{self._output}/") for f in finals], "records": records,
                "tokens": tokens, "sum_l2_norm": sum_norm, "sum_squared_norm": sum_squared}
        write_json(f"{self._output}/{COMMITS}/{commit}.json",
                   {"commit": commit, "samples": sorted(self._samples), "hooks": hooks})
        yield WindowedValue(commit, GlobalWindow().max_timestamp(), [GlobalWindow()])


def remove_uncommitted(output: str, hooks: tuple[Hook, ...], commits: list[dict]) -> list[str]:
    """Deletes temporary files and hook files that no commit lists (left by killed bundles)."""
    kept = {f"{output}/{f}" for c in commits for h in c["hooks"].values() for f in h["files"]}
    patterns = [f"{output}/{COMMITS}/.*{TEMPORARY_SUFFIX}"]
    for hook in hooks:
        patterns += [f"{hook_dir(output, hook)}/*.tfrecord", f"{hook_dir(output, hook)}/.*{TEMPORARY_SUFFIX}"]
    stray = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list if m.path not in kept]
    if stray:
        FileSystems.delete(stray)
    return stray


class WriteDeadLetters(beam.PTransform):
    """Dead letters as JSON lines under OUT/dead_letter/ (an empty file when there are none)."""

    def __init__(self, output: str):
        super().__init__()
        self._output = output

    def expand(self, dead_letters):
        return (
            dead_letters
            | "ToJson" >> beam.Map(lambda letter: letter.to_json())
            | "Write" >> beam.io.WriteToText(f"{self._output}/dead_letter/part", file_name_suffix=".jsonl",
                                             num_shards=1)
        )
