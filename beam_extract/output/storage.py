"""Reading output files, local or gs://, without Apache Beam: readers of the output import this on
machines that have neither Beam nor JAX, and the pipeline reads its own commits through it too.

gs:// goes through google-cloud-storage (imported on first use), which honours
STORAGE_EMULATOR_HOST. A pattern matches as Beam's `FileSystems.match` does: `*` and `?` stay within
one path segment (and match names starting with a dot), `**` crosses segments.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
from typing import BinaryIO

GLOB = re.compile(r"\*\*|\*|\?|\[!?[^\]]*\]")
GCS_READ_CHUNK = 8 << 20  # a record stream reads this much per request: few requests, bounded memory
_GCS_POOL = 64  # connections kept per client: the commit store reads many small objects at once
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _gcs_client():
    """One client per process and emulator address: clients are not fork-safe, and tests point
    STORAGE_EMULATOR_HOST at a different server per test."""
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    with _clients_lock:
        if key not in _clients:
            from google.cloud import storage
            from requests.adapters import HTTPAdapter

            client = storage.Client()
            adapter = HTTPAdapter(pool_connections=_GCS_POOL, pool_maxsize=_GCS_POOL)
            for scheme in ("https://", "http://"):
                client._http.mount(scheme, adapter)
            _clients[key] = client
        return _clients[key]


def _blob(path: str):
    bucket, _, name = path.removeprefix("gs://").partition("/")
    return _gcs_client().bucket(bucket).blob(name)


def exists(path: str) -> bool:
    """Whether a file is there (a directory is not a file)."""
    if path.startswith("gs://"):
        return _blob(path).exists()
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
        bucket, _, name_prefix = prefix.removeprefix("gs://").partition("/")
        names = (f"gs://{bucket}/{blob.name}" for blob in _gcs_client().list_blobs(bucket, prefix=name_prefix))
    else:
        root = os.path.dirname(prefix)
        names = (os.path.join(directory, name).removeprefix("" if root else "./")
                 for directory, _, files in os.walk(root or ".") for name in files)
    return sorted(path for path in names if regex.fullmatch(path))


def open_read(path: str) -> BinaryIO:
    """A binary stream of a file's bytes as stored (never decompressed)."""
    if path.startswith("gs://"):
        # raw_download: bytes as stored, even for an object with a Content-Encoding
        return _blob(path).open("rb", chunk_size=GCS_READ_CHUNK, raw_download=True)
    return open(path, "rb")


def read_bytes(path: str) -> bytes:
    """A whole file's bytes; a name ending in .gz is decompressed (as Beam compresses by the name)."""
    if path.startswith("gs://"):
        data = _blob(path).download_as_bytes(raw_download=True)
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
        _blob(path).upload_from_string(data)
        return
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)
