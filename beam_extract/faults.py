"""Injected failures, for tests of retries and resumes on real runners.

BEAM_EXTRACT_FAULT="POINT:MARKER[,POINT:MARKER...]" makes the first worker that reaches POINT fail
there, once: it creates the file MARKER (create-if-absent, so only one process or retry wins) and
raises. The runner then retries the work (the BundleBasedDirectRunner, Flink, Dataflow) or fails the
job (Prism), and `--resume` completes it. Unset, as on every real job, it costs one environment
lookup.
"""

from __future__ import annotations

import os

FAULT_ENV = "BEAM_EXTRACT_FAULT"
# Where a fault can be injected: before a batch's forward; after a shard group's files and commit
# record are written, before its bundle completes; in the finalization, after failed attempts' files
# are removed and before the manifest is written.
POINTS = ("before_forward", "after_writes", "finalize")


class InjectedFault(RuntimeError):
    pass


def maybe_fail(point: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for fault in spec.split(","):
        wanted, _, marker = fault.partition(":")
        if wanted not in POINTS or not marker:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected POINT:MARKER_FILE, POINT one of {', '.join(POINTS)}")
        if wanted != point:
            continue
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue  # this one failed once already
        raise InjectedFault(f"injected fault at {point} ({FAULT_ENV})")
