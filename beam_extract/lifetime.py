"""Worker processes that die with the driver that started them.

Beam's local runners run DoFns in the driver or in processes it started (multi-process mode, a
local worker pool). Killed with kill -9, the driver cannot stop them: they would go on writing into
an output that a `--resume` started at once then shares. A worker on the driver's host watches the
driver's process and exits as soon as it is gone; one that starts after the driver died exits at
once.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from typing import NamedTuple

POLL_SECONDS = 0.1
_watching = False
_lock = threading.Lock()


class Driver(NamedTuple):
    """The process that owns a local job: its machine, pid and the pid's start time (pids get reused)."""

    host: str  # machine_id(): pids mean something only on the same machine and in the same pid namespace
    pid: int
    start: str | None


@functools.cache
def machine_id() -> str:
    """This host and pid namespace: containers that share a hostname (or a volume) differ here."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else open(path).read().strip())
        except OSError:
            pass
    return " ".join(parts)


def process_start(pid: int) -> str | None:
    """The start time of a local process (field 22 of /proc/PID/stat), None if it does not run.
    Without /proc (not Linux) only liveness can be told: "alive"."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        if os.path.isdir("/proc/self"):
            return None
    try:
        os.kill(pid, 0)
        return "alive"
    except PermissionError:
        return "alive"
    except OSError:
        return None


def this_driver() -> Driver:
    return Driver(machine_id(), os.getpid(), process_start(os.getpid()))


def driver_alive(driver: Driver) -> bool:
    return process_start(driver.pid) == driver.start


def exit_with_driver(driver: Driver | None) -> None:
    """On the driver's host, exits this process once the driver is gone (at once if it already
    is). Does nothing for a remote job (None) or on another host."""
    global _watching
    if driver is None or driver.host != machine_id() or driver.pid == os.getpid():
        return
    if not driver_alive(driver):
        os._exit(70)
    with _lock:
        if _watching:
            return
        _watching = True

    def watch() -> None:
        while driver_alive(driver):
            time.sleep(POLL_SECONDS)
        os._exit(70)  # not sys.exit: it must not wait for the threads still writing

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


def stop_if_driver_gone(driver: Driver | None) -> None:
    """Called right before a commit, so none lands after the driver died."""
    if driver is not None and driver.host == machine_id() and not driver_alive(driver):
        os._exit(70)
