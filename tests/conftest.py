import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# Tests never reach the network: hub lookups must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One model cache per test session, so no test depends on what an earlier run left."""
    os.environ["BEAM_EXTRACT_CACHE"] = str(tmp_path_factory.mktemp("beam_extract_cache"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(command: list[str], port: int, name: str) -> subprocess.Popen:
    """Starts a server on loopback and waits until it accepts connections."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs_bucket():
    """A real GCS JSON API server (gcp-storage-emulator) on loopback; yields a gs:// bucket URL.

    Beam's gs:// IO and the storage client reach it through STORAGE_EMULATOR_HOST. NO_GCE_CHECK
    stops google-auth from probing the cloud metadata server for credentials.
    """
    port = free_port()
    server = serve([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                    "--in-memory", "--default-bucket", "beam-extract-test"], port, "the GCS emulator")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["NO_GCE_CHECK"] = "true"
    from emulator_auth import start_anonymous_if_emulated

    start_anonymous_if_emulated()
    try:
        yield "gs://beam-extract-test"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture()
def gcs_with_preconditions(monkeypatch, tmp_path):
    """fake-gcs-server (built by `make test` into the venv) on loopback: a GCS JSON API server that
    enforces ifGenerationMatch, as GCS does (gcp-storage-emulator ignores it). Yields a gs:// bucket
    URL; the storage client reaches it through STORAGE_EMULATOR_HOST for this test only."""
    binary = Path(sys.executable).parent / "fake-gcs-server"
    binary = str(binary) if binary.exists() else shutil.which("fake-gcs-server")
    assert binary, "fake-gcs-server is not installed: run `make test` (it builds it into .venv/bin)"
    port = free_port()
    (tmp_path / "gcs-data" / "locks").mkdir(parents=True)
    server = serve([binary, "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                    "-public-host", f"127.0.0.1:{port}", "-data", str(tmp_path / "gcs-data"), "-log-level", "error"],
                   port, "fake-gcs-server")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    try:
        yield "gs://locks"
    finally:
        server.terminate()
        server.wait(timeout=10)


def upload_dir(local, url):
    """Copies every file of a local directory to gs:// with Beam's FileSystems."""
    from apache_beam.io.filesystems import FileSystems

    for path in sorted(local.iterdir()):
        if path.is_file():
            with FileSystems.create(f"{url}/{path.name}") as handle:
                handle.write(path.read_bytes())
