"""Activation records -> rolling TFRecord shards per hook, committed per shard group.

Layout: OUT/{site}/layer_{LL}/part-{group}.tfrecord, or in streaming, where every record belongs to a
time window, part-w{window start}-{group}.tfrecord. A writer keeps one open *shard group* per
window: a file per hook, all holding the same samples. It closes the group once a file reaches the
shard size or its bundle ends, records it in OUT/_committed/{group}.json (see `format.commits`) and
passes it on. Files are written in place, never renamed (a rename on gs:// is a copy): an unlisted
file is invisible to readers. Group ids are new for every bundle attempt, so a retried bundle never
overwrites a file of its failed attempt; only the groups the pipeline passes on count (`format.commits`).
Files per hook: about bytes / shard size, plus one partial file per bundle (and window).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows, IntervalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_extract.faults import maybe_fail
from beam_extract.format.commits import COMMITS, TEMPORARY_SUFFIX, commit_path, group_files, ours
from beam_extract.format.storage import list_paths
from beam_extract.format.tfrecord import write_record
from beam_extract.hooks import Hook, hook_name
from beam_extract.lifetime import Driver, exit_with_driver, stop_if_driver_gone
from beam_extract.sink.commits import delete_quietly, write_json
from beam_extract.sink.extracted import HOOK_STATS, ExtractedBatch

# Threads writing a batch's hooks at once; more buys nothing once the disk or network is busy.
MAX_WRITE_THREADS = 8


def hook_dir(output: str, hook: Hook) -> str:
    layer, site = hook
    return f"{output}/{site}/layer_{layer:02d}"


def window_span(window) -> tuple[str, str] | None:
    """(start, end) of a time window as UTC names like 20250101T120000Z; None for the global window."""
    if not isinstance(window, IntervalWindow):
        return None
    return tuple(datetime.datetime.fromtimestamp(float(t), datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
                 for t in (window.start, window.end))


class _ShardGroup:
    """One open file per hook, filled with the same samples."""

    def __init__(self, output: str, hooks: tuple[Hook, ...], group: str, window):
        self.group, self.window, self.samples, self.digests = group, window, [], []
        span = window_span(window)
        self.span = span
        name = f"part-w{span[0]}-{group}" if span else f"part-{group}"
        self.files = [f"{hook_dir(output, hook)}/{name}.tfrecord" for hook in hooks]
        self.handles = [None] * len(hooks)
        self.stats = [{"records": 0, **dict.fromkeys(HOOK_STATS, 0)} for _ in hooks]
        self.size = 0  # bytes of the largest file

    def add(self, batch: ExtractedBatch, hooks: tuple[Hook, ...], pool: ThreadPoolExecutor | None,
            norm_exclude_first: int) -> None:
        """Appends a batch's records to every hook's file, the hooks in parallel on `pool`."""

        def write(index: int) -> int:
            if self.handles[index] is None:
                self.handles[index] = FileSystems.create(self.files[index])
            layer, site = hooks[index]
            size = sum(write_record(self.handles[index], data)
                       for data in batch.records(index, hook_name(layer, site), layer))
            stats, added = self.stats[index], batch.hook_stats(index, norm_exclude_first)
            stats["records"] += len(batch.samples)
            for key, value in added.items():
                stats[key] += value
            return size

        indices = range(len(self.files))
        sizes = list(pool.map(write, indices) if pool else map(write, indices))
        self.samples += [s.sample.sample_id for s in batch.samples]
        self.digests += [s.digest for s in batch.samples]
        self.size += max(sizes)

    def close(self, output: str, hooks: tuple[Hook, ...]) -> dict:
        for handle in self.handles:
            if handle is not None:
                handle.close()
        written = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        return {
            "group": self.group,
            "written": written,
            "samples": self.samples,
            "digests": self.digests,
            "hooks": {hook_name(*hook): {"files": [f.removeprefix(f"{output}/")] if handle else [], **stats}
                      for hook, f, handle, stats in zip(hooks, self.files, self.handles, self.stats)},
            "window": dict(zip(("start", "end"), self.span)) if self.span else None,
            # Which process wrote it: provenance for debugging a worker (and how tests see where DoFns ran).
            "worker": {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid()},
        }


class WriteShards(beam.DoFn):
    """Extracted batches -> shard groups, each committed when closed; yields each committed group
    (its record under OUT/_committed/) in the window of its records. A batch's hooks are encoded and
    written in parallel threads: the CRCs, joins and writes of large records release the GIL."""

    def __init__(self, output: str, hooks: tuple[Hook, ...], shard_bytes: int, shuffle_seed: int | None = None,
                 driver: Driver | None = None, norm_exclude_first: int = 0):
        self._output, self._hooks, self._shard_bytes = output, hooks, shard_bytes
        self._norm_exclude_first = norm_exclude_first
        self._shuffle_seed = shuffle_seed  # None: records keep batch order
        self._driver = driver  # a local job's driver: its worker processes die with it

    def setup(self):
        exit_with_driver(self._driver)
        threads = min(len(self._hooks), os.cpu_count() or 1, MAX_WRITE_THREADS)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="write-hooks") if threads > 1 else None

    def teardown(self):
        if getattr(self, "_pool", None):
            self._pool.shutdown()

    def start_bundle(self):
        self._attempt = uuid.uuid4().hex[:12]  # new for every attempt at a bundle
        self._open: dict = {}  # window -> _ShardGroup

    def process(self, batch: ExtractedBatch, window=beam.DoFn.WindowParam):
        if not batch.samples:
            return
        ids = "\x00".join(sorted(s.sample.sample_id for s in batch.samples)).encode()
        if self._shuffle_seed is not None:
            draw = int.from_bytes(hashlib.sha256(ids).digest()[:8], "little")
            rng = np.random.default_rng([self._shuffle_seed, draw])
            batch = batch.in_order(rng.permutation(len(batch.samples)))
        group = self._open.get(window)
        if group is None:
            # Named by its first batch, so a rerun lists its files in the same order, and by the
            # attempt, so a retry never writes the name of a failed attempt's file.
            first = hashlib.sha256(ids).hexdigest()[:12]
            group = self._open[window] = _ShardGroup(self._output, self._hooks, f"{first}-{self._attempt}", window)
        group.add(batch, self._hooks, self._pool, self._norm_exclude_first)
        if group.size >= self._shard_bytes:
            yield self._commit(self._open.pop(window))

    def finish_bundle(self):
        for window, group in self._open.items():
            yield WindowedValue(self._commit(group), window.max_timestamp(), (window,))
        self._open = {}

    def _commit(self, group: _ShardGroup) -> dict:
        record = group.close(self._output, self._hooks)
        stop_if_driver_gone(self._driver)
        write_json(commit_path(self._output, group.group), record)
        maybe_fail("after_writes")
        return record


def remove_unlisted(output: str, hooks: tuple[Hook, ...], kept: list[dict]) -> list[str]:
    """Deletes what runs of ours wrote that the kept groups do not list: their commit records, data
    files and temporaries (left by killed or failed attempts). One listing per directory; files
    that do not follow our names are never touched."""
    listed = group_files(output, kept) | {commit_path(output, g["group"]) for g in kept}
    patterns = [f"{output}/{COMMITS}/*.json", f"{output}/{COMMITS}/.*{TEMPORARY_SUFFIX}"]
    for hook in hooks:
        patterns += [f"{hook_dir(output, hook)}/part-*.tfrecord", f"{hook_dir(output, hook)}/.*{TEMPORARY_SUFFIX}"]
    stray = [path for pattern in patterns for path in list_paths(pattern)
             if path not in listed and ours(path, "part", "commit", "temporary")]
    delete_quietly(stray)
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
