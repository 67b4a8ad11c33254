"""JAX's persistent compilation cache: a compiled forward is saved to a directory, and a later process
(a restarted worker, the next job) that asks for the same program loads it instead of compiling.

JAX keys an entry by the program, its compile options, the JAX/XLA version and the devices, so a
changed model, shape, hook set, dtype, mesh or accelerator is a new entry, never a wrong one.

JAX writes the cache through etils.epath, which reaches gs:// only with gcsfs or TensorFlow
installed, and neither is a dependency of this package (the worker image has neither). So a gs://
cache is a mirror instead: at `enable_compilation_cache` this process copies the bucket's entries
into a local directory of its own, JAX reads and writes that directory, and `publish_new_entries`
(called by Model.compiled after each compile) uploads the entries this process added, each as an
object created only if absent (concurrent workers compiling the same program write it once).

Trust: an entry is executable code loaded into the process. Point the cache only at a directory that
no one but the job's own principals can write.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import jax
from jax import monitoring

from beam_extract import gcs

_LOG = logging.getLogger(__name__)
_ENTRY_SUFFIX = "-cache"  # JAX's file for one entry is "<key>-cache" (lru_cache.py)
_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # recorded by JAX in the compiling thread

MIN_COMPILE_SECONDS = 0.2
# --compilation_cache_dir value that turns the cache off (the default is on, see default_directory).
OFF = "none"
_lock = threading.Lock()
_directory: str | None = None  # what enable_compilation_cache was given
_local: Path | None = None  # the directory JAX uses
_remote: str | None = None  # gs://bucket/prefix when _local mirrors it
_published: set[str] = set()  # entry names known to be in _remote
_hits = threading.local()


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache for this process, in `directory` (a local path or
    gs://bucket/prefix). Every program compiled afterwards in at least MIN_COMPILE_SECONDS is saved
    there, and one saved before is loaded instead of compiled.

    Call it before the first compile. Calling it again with the same directory does nothing; another
    directory (a later job in the same process) re-points the cache. A gs:// directory is read now
    (its entries copied to a fresh local directory), so a missing bucket or a missing permission
    fails here, not in the middle of a job."""
    global _directory, _local, _remote
    with _lock:
        if _directory == directory:
            return
        # The new directory is checked and read before anything changes: a refused one leaves the
        # cache this process had.
        entries: set[str] = set()
        if directory.startswith("gs://"):
            remote = directory.rstrip("/")
            # Of this process alone: JAX writes an entry in place, so a directory shared with other
            # processes could hold half-written entries when we upload.
            local = Path(tempfile.mkdtemp(prefix="beam-extract-compile-cache-"))
            entries = _download_entries(remote, local)
        elif "://" in directory:
            raise ValueError(f"compilation cache {directory!r}: expected a local directory or gs://bucket/prefix")
        else:
            remote, local = None, Path(directory).expanduser().absolute()
            local.mkdir(parents=True, exist_ok=True)
        if _directory is not None:  # JAX opens its cache once: make it open the new one
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
            _published.clear()
        jax.config.update("jax_compilation_cache_dir", str(local))
        # The forwards, not the small eager ops around them (JAX's default keeps compiles over 1 s).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor, and none imposed
        # No XLA side caches (by default JAX adds a GPU autotuning cache inside the directory): their
        # path would be part of every entry's key, so a key would depend on where the directory
        # is (a gs:// cache's local mirror is a fresh directory per process). Whole programs are
        # still cached, autotuned kernels included.
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
        _directory, _local, _remote = directory, local, remote
        _published.update(entries)
        _LOG.info("persistent compilation cache in %s%s", directory,
                  f" (local mirror {local}, {len(_published)} entries)" if remote else "")


def default_directory() -> str:
    """A worker's own cache when the job names none: local to its machine (under $BEAM_EXTRACT_CACHE,
    default ~/.cache/beam_extract), one per JAX version, so that a worker started again on the same
    machine (a pool dropping and starting workers between stages, the next local job) loads its
    forwards instead of compiling them."""
    from beam_extract.model.weights import cache_dir

    return str(cache_dir() / "compile-cache" / f"jax-{jax.__version__}")


def publish_new_entries() -> int:
    """Uploads the entries this process added to a gs:// cache; returns how many. Does nothing for a
    local cache. A failed upload is logged, not raised: the cache only saves time."""
    with _lock:
        if _remote is None:
            return 0
        new = sorted(path for path in _local.glob(f"*{_ENTRY_SUFFIX}") if path.name not in _published)
        if not new:
            return 0
        from google.api_core.exceptions import PreconditionFailed

        uploaded = 0
        for path in new:
            try:
                # JAX wrote the file completely before its compile returned; the object appears whole.
                gcs.blob(f"{_remote}/{path.name}").upload_from_filename(
                    str(path), if_generation_match=0)
                uploaded += 1
            except PreconditionFailed:
                pass  # another process uploaded the same program first
            except Exception as error:  # noqa: BLE001 - the cache is an optimisation
                _LOG.warning("could not upload compilation cache entry %s to %s: %s", path.name, _remote, error)
                continue
            _published.add(path.name)
        return uploaded


def hits_in_this_thread() -> int:
    """How many compiles of this thread so far were loaded from the persistent cache."""
    return getattr(_hits, "count", 0)


def _count_hit(event: str, **_) -> None:
    if event == _HIT_EVENT:
        _hits.count = hits_in_this_thread() + 1


monitoring.register_event_listener(_count_hit)


def _download_entries(remote: str, local: Path) -> set[str]:
    """Copies the cache entries directly under `remote` into `local`; returns their names."""
    names = set()
    for blob in gcs.list_directory(remote):
        name = blob.name.rpartition("/")[2]
        if not name.endswith(_ENTRY_SUFFIX):
            continue
        partial = local / f".{name}.partial"
        blob.download_to_filename(str(partial))
        os.replace(partial, local / name)  # JAX never sees half an entry
        names.add(name)
    return names
