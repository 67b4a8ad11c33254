"""What the input files of a run were: each file's name under the input root, its size and a mark
of its version, read from the file system's metadata (the driver reads no input bytes).

A resumed run must read the same files (new ones may be added): a file that changed, vanished, or
is named otherwise (the input root moved) would leave committed samples that no longer match their
input. On gs:// the version mark is the object's CRC32C (its own, listed with it); locally it is the
modification time in nanoseconds, as `rsync` and `make` judge a file: reading a local file to
checksum it would cost the driver a full read of the input (a 1 TB input before any work). Where a
run resumed recorded another kind of mark (a CRC32C for a local file, or the input moved between
local disk and gs://), the sizes are compared; the sample digests under the check still catch a
changed line.
"""

from __future__ import annotations

import os
import stat

from apache_beam.io.filesystems import FileSystems

from beam_extract.io.sources import printable_path
from beam_extract.records.identity import input_root, relative_name

def inventory(pattern: str) -> dict:
    """{"root": the input root, "files": {name: {"size", and "crc32c" (gs://) or "mtime_ns"}}} of the
    regular files matching `pattern` (what the job will read; directories and FIFOs are dead letters,
    not input)."""
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
                status = os.stat(path)
                if not stat.S_ISREG(status.st_mode):
                    continue
                files[printable_path(relative_name(path, root))] = {"size": status.st_size,
                                                                   "mtime_ns": status.st_mtime_ns}
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
             for name in sorted(old.keys() & new.keys())
             if any(old[name][mark] != new[name][mark] for mark in old[name].keys() & new[name].keys())]
    missing = sorted(old.keys() - new.keys())
    if missing:
        found.append(f"{len(missing)} input files of the run resumed are not matched now ({', '.join(missing[:3])}"
                     f"{' ...' if len(missing) > 3 else ''})")
    return found
