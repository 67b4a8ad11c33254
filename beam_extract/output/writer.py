"""Activation records -> TFRecord files per hook, committed per forward batch so finished work survives a kill.

Layout: OUT/{site}/layer_{LL}/part-{commit}-{NNN}.tfrecord, or in streaming, where every batch
belongs to a time window, part-w{window start}-{commit}-{NNN}.tfrecord. Each forward batch is
written to temporary files beside its final ones, renamed, then recorded in
OUT/_committed/{commit}.json with its sample ids, files, statistics and window. The commit id is a
hash of the batch's sample ids, so a retried batch rewrites the same names; a killed one leaves only
files no commit lists, which the next run removes (a batch run when it ends, a resumed streaming run
before it starts). Readers use the manifest (or the commits).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import socket
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows, IntervalWindow

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


def window_span(window) -> tuple[str, str] | None:
    """(start, end) of a time window as UTC names like 20250101T120000Z; None for the global window."""
    if not isinstance(window, IntervalWindow):
        return None
    return tuple(datetime.datetime.fromtimestamp(float(t), datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
                 for t in (window.start, window.end))


def read_commits(output: str) -> list[dict]:
    matches = FileSystems.match([f"{output}/{COMMITS}/*.json"])[0].metadata_list
    return [read_json(m.path) for m in sorted(matches, key=lambda m: m.path)]


class WriteCommitted(beam.DoFn):
    """One batch's records -> files per hook (rolled over at `shard_bytes`) and a commit; yields the
    commit. The commit id hashes the batch's sample ids: a retried batch rewrites the same names."""

    def __init__(self, output: str, hooks: tuple[Hook, ...], shard_bytes: int, shuffle_seed: int | None = None):
        self._output, self._hooks, self._shard_bytes = output, hooks, shard_bytes
        self._shuffle_seed = shuffle_seed  # None: records keep batch order

    def process(self, records: list, window=beam.DoFn.WindowParam):
        if not records:
            return
        samples = sorted({record.sample_id for record in records})
        commit = hashlib.sha256("\n".join(samples).encode()).hexdigest()[:20]
        span = window_span(window)
        part = f"part-w{span[0]}-{commit}" if span else f"part-{commit}"
        if self._shuffle_seed is not None:
            rng = np.random.default_rng([self._shuffle_seed, int(commit, 16) % 2**63])
            records = [records[i] for i in rng.permutation(len(records))]
        hooks = {}
        for index, hook in enumerate(self._hooks):
            mine = [record for record in records if record.hook_index == index]
            temporaries = self._write(hook, mine)
            finals = [f"{hook_dir(self._output, hook)}/{part}-{n:03d}.tfrecord" for n in range(len(temporaries))]
            if finals:
                FileSystems.rename(temporaries, finals)
            hooks[hook_name(*hook)] = {
                "files": [f.removeprefix(f"{self._output}/") for f in finals],
                "records": len(mine),
                "tokens": sum(r.n_tokens for r in mine),
                "sum_l2_norm": sum(r.sum_l2_norm for r in mine),
                "sum_squared_norm": sum(r.sum_squared_norm for r in mine),
            }
        # Which process wrote it: provenance for debugging a worker (and how tests see where DoFns ran).
        worker = {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid()}
        record = {"commit": commit, "samples": samples, "hooks": hooks, "worker": worker,
                  "window": dict(zip(("start", "end"), span)) if span else None}
        write_json(f"{self._output}/{COMMITS}/{commit}.json", record)
        yield record

    def _write(self, hook: Hook, records: list) -> list[str]:
        """Temporary files beside the final ones, each up to shard_bytes."""
        paths, handle, size = [], None, 0
        for record in records:
            if handle is None:
                paths.append(f"{hook_dir(self._output, hook)}/.{uuid.uuid4().hex}.tfrecord{TEMPORARY_SUFFIX}")
                handle, size = FileSystems.create(paths[-1]), 0
            size += write_record(handle, record.example)
            if size >= self._shard_bytes:
                handle.close()
                handle = None
        if handle is not None:
            handle.close()
        return paths


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


def _window_file_name(stage: str, window, pane, shard_index: int, total_shards: int, compression, destination) -> str:
    return f"{stage}-w{window_span(window)[0]}-{shard_index:05d}-of-{total_shards:05d}.jsonl"


class WriteDeadLetters(beam.PTransform):
    """One stage's dead letters as JSON lines, OUT/dead_letter/{stage}-SSSSS-of-NNNNN.jsonl, or per time
    window {stage}-w{window start}-SSSSS-of-NNNNN.jsonl. The runner picks the number of files, so
    millions of dead letters are never gathered in one place. Yields the paths written."""

    def __init__(self, output: str, stage: str):
        super().__init__()
        self._output, self._stage = output, stage

    def expand(self, dead_letters):
        lines = dead_letters | "ToJson" >> beam.Map(lambda letter: letter.to_json())
        directory = f"{self._output}/dead_letter"
        if isinstance(dead_letters.windowing.windowfn, GlobalWindows):
            return lines | "Write" >> beam.io.WriteToText(f"{directory}/{self._stage}", file_name_suffix=".jsonl")
        # Not WriteToText: in a time window it names files by str(window), and stamps the names it
        # returns with the window's end, which is the next window.
        return (
            lines
            | "WritePerWindow" >> fileio.WriteToFiles(directory, file_naming=functools.partial(_window_file_name,
                                                                                               self._stage))
            | "Paths" >> beam.Map(lambda written: f"{directory}/{written.file_name}")
        )
