"""What the input files of a run were: each file's name under the input root, its size and a mark
of its content, at a cost per file that does not grow with the file (the driver never reads the input).

A resumed run must read the same files (new ones may be added): a file that changed, vanished, or
is named otherwise (the input root moved) would leave committed samples that no longer match their
input. On gs:// the content mark is the object's CRC32C (its own, listed with it: no byte read).
Locally it is the CRC32C of the file's first and last ENDS_BYTES (`ends_crc32c`): a checksum of the
whole file would cost the driver a full read of the input (a 1 TB input before any work), and the
modification time changes when an unchanged file is copied or restored (a refusal the user could
not get past). An edit inside a local file that keeps its size and both ends passes this check; the
per-sample digests under it then make each changed sample a `changed_since_commit` dead letter (the
run is not ok), never a skip. Where a run resumed recorded another kind of mark (an older release's,
or the input moved between local disk and gs://), the sizes are compared.
"""

from __future__ import annotations

import base64
import os
import stat

import google_crc32c
from apache_beam.io.filesystems import FileSystems

from beam_extract import gcs
from beam_extract.io.sources import printable_path
from beam_extract.records.identity import input_root, relative_name

ENDS_BYTES = 64 << 10  # read from each end of a local input file


def ends_crc32c(path: str, size: int) -> str:
    """CRC32C (base64, as GCS gives it) of a file's first and last ENDS_BYTES (of all of it if smaller)."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        checksum.update(handle.read(size if size <= 2 * ENDS_BYTES else ENDS_BYTES))
        if size > 2 * ENDS_BYTES:
            handle.seek(size - ENDS_BYTES)
            checksum.update(handle.read(ENDS_BYTES))
    return base64.b64encode(checksum.digest()).decode()


def inventory(pattern: str) -> dict:
    """{"root": the input root, "files": {name: {"size", and "crc32c" (gs://) or "ends_crc32c"}}} of the
    regular files matching `pattern` (what the job will read; directories and FIFOs are dead letters,
    not input)."""
    root = input_root(pattern)
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    files = {}
    if pattern.startswith("gs://"):
        wanted = set(paths)
        bucket = gcs.split(root)[0]
        for blob in gcs.list_directory(root, recursive=True):
            path = f"gs://{bucket}/{blob.name}"
            if path in wanted:
                files[relative_name(path, root)] = {"size": blob.size, "crc32c": blob.crc32c}
    else:
        for path in paths:
            try:
                status = os.stat(path)
                if not stat.S_ISREG(status.st_mode):
                    continue
                files[printable_path(relative_name(path, root))] = {
                    "size": status.st_size, "ends_crc32c": ends_crc32c(path, status.st_size)}
            except OSError:
                continue  # unreadable: the read stage dead-letters it
    return {"root": root, "files": dict(sorted(files.items()))}


def changes(before: dict, now: dict) -> list[str]:
    """Why `now` cannot continue a run over `before`, in words (none: it can)."""
    old, new = before["files"], now["files"]
    if old and not old.keys() & new.keys():
        return [f"no input file is named as in the run resumed (its input root was {before['root']}, now "
                f"{now['root']}; files are named relative to the part of --input before its first wildcard)"]
    found = [f"{name} changed ({', '.join(f'{mark} {old[name][mark]} -> {new[name][mark]}' for mark in differ)})"
             for name in sorted(old.keys() & new.keys())
             for differ in [[m for m in sorted(old[name].keys() & new[name].keys()) if old[name][m] != new[name][m]]]
             if differ]
    missing = sorted(old.keys() - new.keys())
    if missing:
        found.append(f"{len(missing)} input files of the run resumed are not matched now ({', '.join(missing[:3])}"
                     f"{' ...' if len(missing) > 3 else ''})")
    return found
