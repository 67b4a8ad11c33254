"""The commit store: which output files hold finished work, and which samples they hold.

A writer closes a *shard group* (one file per hook, holding the same samples) when its files reach
the shard size or its bundle ends, then records it in OUT/_committed/{group}.json: its sample ids,
its file and statistics per hook, and its window in streaming. Group ids are unique per writer
attempt, so two groups never share an identity or a file.

A group on disk is not yet accepted output: a runner may retry a failed bundle, whose groups stay on
disk beside the retry's. What counts is decided in one place, `select_groups`: the groups the
pipeline passed on (only successful attempts' outputs travel downstream), and, for a run that was
killed, a set of groups on disk in which no sample appears twice (what `--resume` keeps; readers
also read any other group that holds a sample none of those holds, and report the repeats).

This is the store's read side (readers import it without Beam); `beam_extract.sink.commits` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from beam_extract.format.storage import list_paths, open_read, read_json

COMMITS = "_committed"
TEMPORARY_SUFFIX = ".tmp"  # temporary files are hidden (.name.tmp) and never match *.tfrecord or *.json
# The names runs of ours give their files: cleanup deletes nothing else, even beside them.
GROUP = r"[0-9a-f]{12}-[0-9a-f]{12}"
SPAN = r"\d{8}T\d{6}Z"
OUR_NAMES = {
    "part": re.compile(rf"part-(w{SPAN}-)?{GROUP}\.tfrecord"),
    "commit": re.compile(rf"{GROUP}\.json"),
    "temporary": re.compile(r"\..+\.[0-9a-f]{32}\.tmp"),
    "window": re.compile(rf"{SPAN}-{SPAN}\.json"),
    "skip": re.compile(r"[0-9a-f]{12}\.skip\.jsonl"),
    "dead_letter": re.compile(rf"[a-z]+-(w{SPAN}-)?\d{{5}}-of-\d{{5}}\.jsonl"),
}


def ours(path: str, *kinds: str) -> bool:
    """Whether a file's name is one runs of ours give files of these kinds."""
    name = path.rpartition("/")[2]
    return any(OUR_NAMES[kind].fullmatch(name) for kind in kinds)


RUN_SKIP_SUFFIX = ".skip.jsonl"  # OUT/_run/{run id}.skip.jsonl: the sample ids a resumed run skips
READ_THREADS = 32  # commits are small objects: reading them is latency-bound, so many at once


def read_all(paths: Iterable[str]) -> list[dict]:
    """Many small JSON objects, read concurrently, in the order given."""
    paths = list(paths)
    if len(paths) < 2:
        return [read_json(p) for p in paths]
    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        return list(pool.map(read_json, paths))


def commit_path(output: str, group: str) -> str:
    return f"{output}/{COMMITS}/{group}.json"


def read_groups_on_disk(output: str) -> list[dict]:
    """Every group recorded under OUT/_committed/, in name order (accepted or not)."""
    return read_all(path for path in list_paths(f"{output}/{COMMITS}/*.json") if ours(path, "commit"))


class Selection(NamedTuple):
    """What `select_groups` makes of the groups on disk."""

    kept: list[dict]  # no sample in two of them: what a resumed run keeps
    dropped: list[dict]  # the rest: groups whose every sample a kept group holds, and `overlapping`
    overlapping: list[dict]  # dropped groups holding samples that no kept group holds

    @property
    def readable(self) -> list[dict]:
        """The groups readers read: every committed sample, each once unless `problems` says otherwise."""
        return sorted([*self.kept, *self.overlapping], key=_written_order)

    @property
    def problems(self) -> list[str]:
        """Every overlap, in words (none: no sample is in two groups): each group whose samples cannot
        be read without reading some of them twice, and how many groups are left out because other
        groups hold all their samples."""
        held = {sample for group in self.kept for sample in group["samples"]}
        found = []
        if covered := len(self.dropped) - len(self.overlapping):
            found.append(f"{covered} commit groups are left out: other groups hold each of their samples (groups "
                         "of an attempt that failed, or samples committed twice)")
        for group in self.overlapping:
            shared = sum(sample in held for sample in set(group["samples"]))
            repeated = len(group["samples"]) - len(set(group["samples"]))
            found.append(f"commit group {group['group']} holds {len(group['samples'])} samples, {shared} of them also "
                         f"in other groups{f' and {repeated} twice in itself' if repeated else ''}: its samples are "
                         "read with those repeats (a resumed run extracts them again instead)")
        return found


def _written_order(group: dict) -> tuple[str, str]:
    return group.get("written", ""), group["group"]


def select_groups(groups: list[dict]) -> Selection:
    """Kept: groups in which no sample appears twice, taken in (written, group) order; a group sharing
    a sample with one kept before it is dropped (its samples are then either in kept groups or, if
    only in dropped ones, extracted again by a resumed run). A dropped group with samples that no
    kept group holds is never hidden: it is `overlapping`, readers read it and report the repeats.
    Groups overlap only when an attempt that later failed had recorded some before the run was
    killed, or when a task id reached two groups (which the pipeline dead-letters)."""
    kept, dropped, seen = [], [], set()
    for group in sorted(groups, key=_written_order):
        samples = set(group["samples"])
        if len(samples) != len(group["samples"]) or samples & seen:
            dropped.append(group)
        else:
            kept.append(group)
            seen |= samples
    return Selection(kept, dropped, [group for group in dropped if not seen.issuperset(group["samples"])])


def group_files(output: str, groups: Iterable[dict]) -> set[str]:
    """Full paths of the data files the groups list."""
    return {f"{output}/{f}" for g in groups for part in g["hooks"].values() for f in part["files"]}


def without_samples(group: dict) -> dict:
    """What the manifest and window indexes keep of a group: not its sample ids and digests."""
    return {name: value for name, value in group.items() if name not in ("samples", "digests")}


def parse_sample_id(line: str) -> tuple[str, str]:
    """A line of a skip file -> (sample id, digest)."""
    sample_id, digest = json.loads(line)
    return sample_id, digest


def read_sample_ids(path: str) -> dict[str, str]:
    """A whole skip file as {sample id: digest} (streaming jobs' lookup; batch jobs join instead)."""
    with open_read(path) as handle:
        return dict(parse_sample_id(line.decode("utf-8")) for line in handle)
