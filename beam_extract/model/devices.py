"""This host's devices as a local job's workers will see them, found without taking them: JAX starts
in a child process, which lets the accelerator go when it exits (JAX in the driver would hold the
memory, or on a TPU the device itself, that the workers need). Where the workers are threads of
the driver's own process (Beam's in-process runners), they are listed there: the process holds the
devices for its workers anyway, and a child's JAX start costs ~2 CPU-s."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

PROBE = ("import json, jax; d = jax.local_devices(); "
         "print(json.dumps({'platform': d[0].platform, 'kind': d[0].device_kind, 'count': len(d)}))")
PROBE_SECONDS = 300  # a first CUDA or TPU start can take minutes


class DevicesUnavailable(Exception):
    """The host's devices could not be listed (e.g. a TPU held by another process)."""


_LISTING: list[concurrent.futures.Future] = []  # the process's one listing, once started


def start_listing(here: bool = False) -> concurrent.futures.Future:
    """Starts listing this host's devices (once per process) while the caller goes on: a JAX start
    takes seconds that the driver's other checks can share. `here`: in this process (its workers
    are threads of it), not in a child."""
    if not _LISTING:
        _LISTING.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="devices").submit(
            _list_here if here else _list))
    return _LISTING[0]


def local_devices() -> dict:
    """{'platform', 'kind', 'count'} of this host's JAX devices, listed once per process."""
    return start_listing().result()


def _list_here() -> dict:
    from beam_extract.model import mesh  # JAX; imported by the job's modules already

    try:
        found = mesh.local_devices()
    except RuntimeError as error:
        raise DevicesUnavailable(f"could not list this host's devices: {' '.join(str(error).split())[:300]}") from None
    return {"platform": found[0].platform, "kind": found[0].device_kind, "count": len(found)}


def _list() -> dict:
    environment = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # a GPU's memory: only what listing needs
    try:
        result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment,
                                timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        raise DevicesUnavailable(f"listing this host's devices took over {PROBE_SECONDS} s") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise DevicesUnavailable(f"could not list this host's devices: {last[:300]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
