"""What the input files of a run were: each file's name under the input root, size and CRC32C.

A resumed run must read the same files (new ones may be added): a file that changed, vanished, or
is named otherwise (the input root moved) would leave committed samples that no longer match their
input. On gs:// the CRC32C is the object's own (no download); a local file is read once to compute
it, so a local copy and its upload to gs:// agree.
"""

from __future__ import annotations

import base64
import os
import stat

import google_crc32c
from apache_beam.io.filesystems import FileSystems

from beam_extract.io.sources import printable_path
from beam_extract.records.identity import input_root, relative_name

_CHUNK = 1 << 22


def _local_crc32c(path: str) -> str:
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def inventory(pattern: str) -> dict:
    """{"root": the input root, "files": {name: {"size", "crc32c"}}} of the regular files matching
    `pattern` (what the job will read; directories and FIFOs are dead letters, not input)."""
    root = input_root(pattern)
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    files = {}
    if pattern.startswith("gs://"):
        from google.cloud import storage

        wanted = set(paths)
        bucket, _, prefix = root.removeprefix("gs://").partition("/")
        for blob in storage.Client().list_blobs(bucket, prefix=f"{prefix}/" if prefix else ""):
            path = f"gs://{bucket}/{blob.name}"
            if path in wanted:
                files[relative_name(path, root)] = {"size": blob.size, "crc32c": blob.crc32c}
    else:
        for path in paths:
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    continue
                files[printable_path(relative_name(path, root))] = {"size": os.path.getsize(path),
                                                               "crc32c": _local_crc32c(path)}
            except OSError:
                continue  # unreadable: the read stage dead-letters it
    return {"root": root, "files": dict(sorted(files.items()))}


def changes(before: dict, now: dict) -> list[str]:
    """Why `now` cannot continue a run over `before`, in words (none: it can)."""
    old, new = before["files"], now["files"]
    if old and not old.keys() & new.keys():
        return [f"no input file is named as in the run resumed (its input root was {before['root']}, now "
                f"{now['root']}; files are named relative to the part of --input before its first wildcard)"]
    found = [f"{name} changed (size {old[name]['size']} -> {new[name]['size']})"
             for name in sorted(old.keys() & new.keys()) if old[name] != new[name]]
    missing = sorted(old.keys() - new.keys())
    if missing:
        found.append(f"{len(missing)} input files of the run resumed are not matched now ({', '.join(missing[:3])}"
                     f"{' ...' if len(missing) > 3 else ''})")
    return found
