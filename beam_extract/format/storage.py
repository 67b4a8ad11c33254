"""Reading output files, local or gs://, without Apache Beam: readers of the output import this on
machines that have neither Beam nor JAX, and the pipeline reads its own commits through it too.

gs:// goes through the process's one google-cloud-storage client (gcs.py). A pattern matches as
Beam's `FileSystems.match` does: `*` and `?` stay within one path segment (and match names starting
with a dot), `**` crosses segments.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
from typing import BinaryIO

from beam_extract import gcs

GLOB = re.compile(r"\*\*|\*|\?|\[!?[^\]]*\]")
GCS_READ_CHUNK = 8 << 20  # a record stream reads this much per request: few requests, bounded memory


def exists(path: str) -> bool:
    """Whether a file is there (a directory is not a file)."""
    if path.startswith("gs://"):
        return gcs.blob(path).exists()
    return os.path.isfile(path)


def _pattern_regex(pattern: str) -> re.Pattern:
    parts, at = [], 0
    for glob in GLOB.finditer(pattern):
        parts.append(re.escape(pattern[at:glob.start()]))
        token = glob.group()
        if token in ("**", "*", "?"):
            parts.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}[token])
        else:  # a character class; [!...] negates, as in fnmatch
            parts.append("[^" + token[2:] if token.startswith("[!") else token)
        at = glob.end()
    parts.append(re.escape(pattern[at:]))
    return re.compile("".join(parts))


def list_paths(pattern: str) -> list[str]:
    """The files matching a glob, sorted, in one listing (no per-file calls); none is no error."""
    first = GLOB.search(pattern)
    if first is None:
        return [pattern] if exists(pattern) else []
    prefix, regex = pattern[:first.start()], _pattern_regex(pattern)
    if pattern.startswith("gs://"):
        bucket, name_prefix = gcs.split(prefix)
        names = (f"gs://{bucket}/{blob.name}" for blob in gcs.client().list_blobs(bucket, prefix=name_prefix))
    else:
        root = os.path.dirname(prefix)
        names = (os.path.join(directory, name).removeprefix("" if root else "./")
                 for directory, _, files in os.walk(root or ".") for name in files)
    return sorted(path for path in names if regex.fullmatch(path))


def open_read(path: str) -> BinaryIO:
    """A binary stream of a file's bytes as stored (never decompressed)."""
    if path.startswith("gs://"):
        # raw_download: bytes as stored, even for an object with a Content-Encoding
        return gcs.blob(path).open("rb", chunk_size=GCS_READ_CHUNK, raw_download=True)
    return open(path, "rb")


def read_bytes(path: str) -> bytes:
    """A whole file's bytes; a name ending in .gz is decompressed (as Beam compresses by the name)."""
    if path.startswith("gs://"):
        data = gcs.blob(path).download_as_bytes(raw_download=True)
    else:
        with open(path, "rb") as handle:
            data = handle.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


def read_json(path: str) -> dict:
    return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes) -> None:
    """A small file, whole: readers never see a part of it (gs:// objects appear once uploaded; a
    local file is written beside and renamed)."""
    if path.startswith("gs://"):
        gcs.blob(path).upload_from_string(data)
        return
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)
