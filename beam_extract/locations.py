"""Where the job reads and writes, checked in the driver before anything runs: paths made absolute
(gs:// or local), Cloud Storage reachable with credentials, an input that matches files and none of
the job's own, and the directory workers keep compiled forwards in."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable

from apache_beam.io.filesystem import FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from beam_extract import gcs
from beam_extract.format.commits import RUN_SKIP_SUFFIX
from beam_extract.format.storage import exists
from beam_extract.hooks import SITES
from beam_extract.options import UsageError


def compilation_cache_dir(given: str, options: PipelineOptions, remote: bool) -> str:
    """Where workers keep compiled forwards: as given ("none": nowhere), on Dataflow, where every
    worker would otherwise compile every shape anew, under the job's temp location (a prefix per
    JAX version: workers copy the entries at start-up, and another version's are of no use), and
    elsewhere "": each worker's local default (compile_cache.default_directory)."""
    if given == "none":
        return given
    if not given:
        temp = options.view_as(GoogleCloudOptions).temp_location
        if options.view_as(StandardOptions).runner != "DataflowRunner" or not temp:
            return ""
        given = f"{temp.rstrip('/')}/beam-extract-compile-cache/jax-{jax_version()}"
    local = location("--compilation_cache_dir", given)
    if local.startswith("gs://"):
        return local
    if remote:
        raise UsageError(f"--compilation_cache_dir {given!r}: a job that runs elsewhere needs a gs:// directory "
                         "its workers share")
    try:
        os.makedirs(local, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--compilation_cache_dir {given!r}: cannot create it ({error.strerror})") from None
    if not os.access(local, os.W_OK):
        raise UsageError(f"--compilation_cache_dir {given!r}: not writable")
    return local


def location(option: str, given: str) -> str:
    """gs://bucket/path (without a trailing /), or a local path made absolute with ~ expanded.
    Another scheme, a misspelt gs:// or no bucket is refused: never a local directory named `gs:`."""
    if given.startswith("gs://"):
        if not gcs.split(given)[0]:
            raise UsageError(f"{option} {given!r}: name a bucket, gs://bucket/path (is a variable in it unset?)")
        return given.rstrip("/")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", given):
        raise UsageError(f"{option} {given!r}: use a local directory or gs://bucket/path")
    if not given.strip():
        raise UsageError(f"{option}: name a directory")
    return os.path.abspath(os.path.expanduser(given))


def jax_version() -> str:
    """The installed jaxlib's version, without importing JAX in the driver."""
    from importlib import metadata

    return metadata.version("jaxlib")


ANSWER_SECONDS = 30  # for Cloud Storage's first answer: its client retries an unreachable endpoint for minutes


def _bounded(call: Callable, seconds: float):
    """call(), or TimeoutError after `seconds`; in a daemon thread, so that a call that hangs (no
    network) does not keep the driver from exiting."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append((True, call()))
        except Exception as error:
            outcome.append((False, error))

    thread = threading.Thread(target=target, name="bounded-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer in {seconds} s")
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def check_gcs(paths: dict[str, str]) -> None:
    """gs:// paths need credentials and an answer from Cloud Storage: checked once in the driver,
    in bounded time, instead of a traceback or a listing retried for minutes."""
    remote = {option: path for option, path in paths.items()  # one without a bucket is refused by `location`
              if path.startswith("gs://") and gcs.split(path)[0]}
    if not remote:
        return
    if not os.environ.get("STORAGE_EMULATOR_HOST"):  # an emulator takes anonymous requests
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            google.auth.default()
        except DefaultCredentialsError as error:
            raise UsageError(f"{', '.join(remote)} on gs:// need Google Cloud credentials (gcloud auth "
                             f"application-default login, or GOOGLE_APPLICATION_CREDENTIALS): {_one_line(error)}") from None
    option, path = next(iter(remote.items()))
    bucket = gcs.split(path)[0]
    try:  # one small request (absent or present, an answer either way)
        _bounded(lambda: exists(f"gs://{bucket}/.beam-extract-reachable"), ANSWER_SECONDS)
    except TimeoutError as error:
        raise UsageError(f"{option} {path}: Cloud Storage gave {error} (is the network reachable?)") from None
    except Exception as error:
        raise UsageError(f"{option} {path}: {_one_line(error)}") from None


def input_paths(pattern: str) -> list[str]:
    try:
        paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception as error:  # Beam wraps each file system's errors in its own
        raise UsageError(f"--input {pattern}: {_one_line(error)}") from None
    if not paths:
        raise UsageError(f"--input {pattern}: no file matches")
    directory = next((p for p in paths if "://" not in p and os.path.isdir(p)), None)
    if directory:
        raise UsageError(f"--input {pattern}: {directory} is a directory; name its files, e.g. {directory}/*.jsonl")
    return paths


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:500]


# A file of each kind a run writes into its output, named as runs of ours name them (commits.OUR_NAMES).
OUTPUT_FILES = ("manifest.json", "_run/fingerprint.json", "_run/inputs.json", "_run/lock.json",
                f"_run/.lock.json.{'0' * 32}.tmp", f"_run/{'0' * 12}{RUN_SKIP_SUFFIX}",
                f"_committed/{'0' * 12}-{'0' * 12}.json", "_windows/20260101T000000Z-20260101T001000Z.json",
                "dead_letter/read-00000-of-00001.jsonl", f"{SITES[0]}/layer_00/part-{'0' * 12}-{'0' * 12}.tfrecord")


def check_input_outside_output(pattern: str, output: str) -> None:
    """A glob that would match the job's own files would read them as input (and record them as the
    run's input files, so that no --resume matches again)."""
    matches = re.compile(FileSystem.translate_pattern(pattern)).match  # how every Beam file system matches
    covered = next((name for name in OUTPUT_FILES if matches(f"{output}/{name}")), None)
    if covered:
        raise UsageError(f"--input {pattern} matches the job's own output files ({output}/{covered}); choose an "
                         "--output outside what --input matches, or a narrower --input")
