"""`python -m beam_extract.portable_local [job options]`: the self-managed worker-pool topology on one
machine. Beam's Python job service stands in for the Flink or Spark job server; a Beam worker pool
(what each TPU VM runs in production) executes the job's DoFns in processes it spawns; the job is
submitted with PortableRunner and an EXTERNAL environment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[2]} exited with code {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {seconds} s") from None
            time.sleep(0.2)


@contextlib.contextmanager
def local_worker_pool() -> Iterator[tuple[list[str], subprocess.Popen]]:
    """Starts a job service and a worker pool on loopback; yields the runner options for a job and
    the pool's process (its children run the DoFns). Both stop when the block ends."""
    job_port, pool_port = free_port(), free_port()
    # The pool starts workers with the `python` found on PATH: put this interpreter's first.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    job_service = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(job_port, job_service)
        wait_for_port(pool_port, pool)
        yield ["--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}", "--environment_type=EXTERNAL",
               f"--environment_config=localhost:{pool_port}"], pool
    finally:
        for process in (pool, job_service):
            process.terminate()
        for process in (pool, job_service):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def main(argv: list[str] | None = None) -> None:
    from beam_extract.__main__ import main as extract

    with local_worker_pool() as (runner_args, _):
        extract(runner_args + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
