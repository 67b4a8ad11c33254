"""Cloud Storage: the one place that parses a gs:// path and the one client of a process.

Every module that reaches gs:// without Beam's FileSystems (the output's reader and commit store, the
ownership lock, the input inventory, remote weights, the compilation cache) goes through here, so
a path means the same object everywhere and a process opens one connection pool, not one per call.
google-cloud-storage is imported on first use (it honours STORAGE_EMULATOR_HOST); nothing else is
imported, so the output's readers can use this on machines without Beam or JAX.
"""

from __future__ import annotations

import os
import threading

_POOL = 64  # connections kept per client: the commit store reads many small objects at once
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def split(path: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b"); gs://bucket and gs://bucket/ -> ("bucket", ""). The
    name is kept as given (a leading or doubled slash is part of an object's name, as in Beam)."""
    bucket, _, name = path.removeprefix("gs://").partition("/")
    return bucket, name


def client():
    """One client per process and emulator address: clients are not fork-safe, and tests point
    STORAGE_EMULATOR_HOST at a different server per test."""
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    with _clients_lock:
        if key not in _clients:
            from google.cloud import storage
            from requests.adapters import HTTPAdapter

            made = storage.Client()
            adapter = HTTPAdapter(pool_connections=_POOL, pool_maxsize=_POOL)
            for scheme in ("https://", "http://"):
                made._http.mount(scheme, adapter)
            _clients[key] = made
        return _clients[key]


def blob(path: str):
    """The object at gs://bucket/name (no request is made)."""
    bucket, name = split(path)
    return client().bucket(bucket).blob(name)


def list_directory(directory: str, recursive: bool = False):
    """The objects under the "directory" gs://bucket/a (a name prefix `a/`; the whole bucket for
    gs://bucket), those in its subdirectories too if `recursive`. Without `recursive`, the listing's
    `prefixes` name the subdirectories once its pages are read."""
    bucket, name = split(directory.rstrip("/"))
    return client().list_blobs(bucket, prefix=f"{name}/" if name else "", delimiter=None if recursive else "/")
