"""The commit store's write side, through Beam's FileSystems: commits and indexes written whole,
files deleted, the sample ids a resumed run skips. `beam_extract.format.commits` reads what these write."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable

from apache_beam.io.filesystems import FileSystems

from beam_extract.format.commits import RUN_SKIP_SUFFIX, TEMPORARY_SUFFIX
from beam_extract.format.storage import exists


def write_json(path: str, value: dict) -> None:
    """Readers never see a partial file. A gs:// object becomes visible only once its upload is
    complete, so it is written in place (a rename there would copy it); a local file is written to
    a temporary name and renamed."""
    data = json.dumps(value, indent=1).encode("utf-8")
    if path.startswith("gs://"):
        with FileSystems.create(path) as handle:
            handle.write(data)
        return
    directory, _, name = path.rpartition("/")
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
    with FileSystems.create(temporary) as handle:
        handle.write(data)
    FileSystems.rename([temporary], [path])


def delete_quietly(paths: list[str]) -> None:
    """Deletes what is still there: a file removed meanwhile (by a cleanup before ours) is no error."""
    for path in paths:
        try:
            FileSystems.delete([path])
        except Exception:  # Beam wraps the not-found error of each file system in its own
            if exists(path):
                raise


def write_sample_ids(path: str, digests: Iterable[tuple[str, str]]) -> None:
    """(sample id, digest of what was committed) pairs, one JSON pair a line in an uncompressed file:
    what a resumed run skips. Workers read it in byte ranges, in parallel, and join it with the
    samples by id, so no worker holds all of it."""
    assert path.endswith(RUN_SKIP_SUFFIX), path
    quote = json.encoder.encode_basestring_ascii  # json.dumps's own quoting, without its per-call cost
    with FileSystems.create(path, compression_type="uncompressed") as handle:
        pairs = iter(digests)
        while chunk := list(itertools.islice(pairs, 65536)):
            handle.write("".join(f"[{quote(sample)}, {quote(digest)}]\n" for sample, digest in chunk).encode("ascii"))
