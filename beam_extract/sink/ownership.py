"""Who owns an output directory: the run whose output it holds (its fingerprint and input files)
and the job that writes it now (its lock).

- OUT/_run/fingerprint.json: the run's identity (what it holds, and how a `--resume` with another
  is refused, is resume.py's), written by the first job on an output. OUT/_run/inputs.json: the
  input files (io.inventory); a resumed run must read the same ones.
- OUT/_run/lock.json: taken by a job before it writes anything and released when it ends. Locally
  it is linked into place with its content (never seen empty) under an flock on a side file, so
  two jobs breaking the same stale lock cannot both win; on gs:// it is an object created only if
  absent (ifGenerationMatch=0) and deleted by generation. A second job is refused with the
  holder's identity. A lock is stale, and taken over, when it names this machine (host, boot and
  pid namespace) and a process that no longer runs (or a new process under a reused pid). A lock
  from another machine or from a job on a remote runner is never broken automatically: delete it
  once you know that job has stopped.
- We never write into, or delete from, a directory that holds files no run of ours wrote.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import json
import os
import uuid

from apache_beam.io.filesystems import FileSystems

from beam_extract import gcs
from beam_extract.format.commits import TEMPORARY_SUFFIX, ours
from beam_extract.format.storage import list_paths, read_json
from beam_extract.io.inventory import changes as inventory_changes
from beam_extract.lifetime import machine_id, process_start, this_driver
from beam_extract.sink.commits import delete_quietly, write_json

RUN_DIR = "_run"
FINGERPRINT = f"{RUN_DIR}/fingerprint.json"
INPUTS = f"{RUN_DIR}/inputs.json"
LOCK = f"{RUN_DIR}/lock.json"


class OutputRefused(Exception):
    """The job cannot use this output (or continue the run it holds); the message says why and
    what to do. Printed as one line, exit code 2."""


def _entries(output: str) -> list[str]:
    """Names directly under `output` (files and directories); [] if it does not exist."""
    if output.startswith("gs://"):
        name = gcs.split(output)[1]
        prefix = f"{name}/" if name else ""
        listing = gcs.list_directory(output)
        names = [blob.name for blob in listing]  # the prefixes are known once the pages are read
        return sorted({n[len(prefix):].rstrip("/") for n in names + list(listing.prefixes)} - {""})
    return sorted(os.listdir(output)) if os.path.isdir(output) else []


def _describe(holder: dict) -> str:
    return (f"run {holder.get('run_id')} ({holder.get('runner')}) started {holder.get('started')} by pid "
            f"{holder.get('pid')} on {holder.get('host', '?').split()[0]}")


def _is_stale(holder: dict) -> bool:
    """Only a local job on this machine (and pid namespace) whose process is gone."""
    if holder.get("remote") or holder.get("host") != machine_id():
        return False
    return process_start(int(holder.get("pid", -1))) != holder.get("pid_start")


class _Lock:
    """Create-if-absent, read and delete of one small object, local or gs://."""

    def __init__(self, path: str):
        self.path = path

    def create(self, content: dict) -> bool:
        """Atomic, with its content: a reader never sees an empty lock, even after a kill -9."""
        data = json.dumps(content, indent=1).encode()
        if self.path.startswith("gs://"):
            from google.api_core.exceptions import PreconditionFailed

            try:
                self._blob().upload_from_string(data, if_generation_match=0)
                return True
            except PreconditionFailed:
                return False
        written = f"{self.path}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
        with open(written, "wb") as handle:
            handle.write(data)
        try:
            os.link(written, self.path)  # fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(written)

    def read(self) -> dict | None:
        """The holder; None if there is no lock, {} if it cannot be parsed."""
        if self.path.startswith("gs://"):
            from google.api_core.exceptions import NotFound

            try:
                data = self._blob().download_as_bytes()
            except NotFound:
                return None
        else:
            try:
                with open(self.path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                return None
        try:
            return json.loads(data)
        except ValueError:
            return {}

    def remove_if(self, expected: dict) -> bool:
        """Removes the lock only if it still holds `expected` (another job may have taken it over):
        on gs:// by generation; locally under `guard`."""
        if self.path.startswith("gs://"):
            from google.api_core.exceptions import NotFound, PreconditionFailed

            blob = self._blob()
            try:
                blob.reload()
                if json.loads(blob.download_as_bytes(if_generation_match=blob.generation)) != expected:
                    return False
                blob.delete(if_generation_match=blob.generation)
            except (NotFound, PreconditionFailed, ValueError):
                return False
            return True
        with self.guard():
            if self.read() != expected:
                return False
            os.remove(self.path)
            return True

    @contextlib.contextmanager
    def guard(self):
        """Locally, every check-then-change of the lock holds an exclusive flock on a side file, so
        two jobs breaking the same stale lock cannot remove each other's new one."""
        if self.path.startswith("gs://"):
            yield
            return
        with open(f"{os.path.dirname(self.path)}/.guard", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _blob(self):
        return gcs.blob(self.path)


def take_lock(output: str, run_id: str, runner: str, remote: bool) -> dict:
    """Takes OUT/_run/lock.json for this job, or raises OutputRefused naming its holder."""
    lock = _Lock(f"{output}/{LOCK}")
    driver = this_driver()
    mine = {"run_id": run_id, "host": driver.host, "pid": driver.pid, "pid_start": driver.start, "runner": runner,
            "remote": remote, "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    try:
        if not output.startswith("gs://"):
            os.makedirs(os.path.dirname(lock.path), exist_ok=True)
        for _ in range(3):
            with lock.guard():
                if lock.create(mine):
                    return mine
                holder = lock.read()
                if holder is None:
                    continue  # released meanwhile
                if not holder:
                    raise OutputRefused(f"{lock.path} is unreadable; if no job writes {output}, delete it and "
                                        "start again")
                if not _is_stale(holder):
                    raise OutputRefused(f"{output} is in use by {_describe(holder)}; if that job has stopped, "
                                        f"delete {lock.path} and start again")
            lock.remove_if(holder)  # stale: its process is gone
    except OSError as error:
        raise OutputRefused(f"--output {output}: {error.strerror or error}") from None
    raise OutputRefused(f"could not take {lock.path}: other jobs keep taking it")


def release_lock(output: str, held: dict) -> bool:
    return _Lock(f"{output}/{LOCK}").remove_if(held)


OURS = (RUN_DIR, "_committed", "_windows", "dead_letter", "manifest.json")


GLOB_CHARACTERS = "*?[]{}"


def check_output(output: str, resume: bool, site_names: set[str], overwrite: bool = False) -> dict | None:
    """Refuses an output that this job must not write into; returns the fingerprint of the run it
    holds (None for an empty or new directory), which a --resume job then compares with its own
    (resume.refuse_changes). Reads only: called before the lock is taken (so a refused directory is
    left as it was) and again once it is held."""
    if any(c in output for c in GLOB_CHARACTERS):
        raise OutputRefused(f"--output {output}: glob characters ({GLOB_CHARACTERS}) are not allowed in the output "
                            "path (its files are found by patterns)")
    if not output.startswith("gs://") and os.path.exists(output) and not os.path.isdir(output):
        raise OutputRefused(f"--output {output} is a file, not a directory")
    if not output.startswith("gs://"):
        for directory, subdirectories, files in os.walk(output):
            link = next((name for name in subdirectories + files if os.path.islink(f"{directory}/{name}")), None)
            if link:  # cleanup would reach through it, out of the output
                raise OutputRefused(f"--output {output} holds a symbolic link, {directory}/{link}; nothing was "
                                    "changed: remove it or choose another --output")
    entries = _entries(output)
    entries = [e for e in entries if not (e.startswith(".") and e.endswith(TEMPORARY_SUFFIX))]
    recorded = f"{output}/{FINGERPRINT}"
    if not FileSystems.exists(recorded):
        foreign = [e for e in entries if e != RUN_DIR]
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise OutputRefused(f"{output} holds files that no beam-extract run of this version recorded ({shown}); "
                                "nothing was changed: choose an empty or new --output")
        return None
    before = read_json(recorded)
    foreign = [e for e in entries if e not in OURS and e not in site_names]
    if foreign:
        raise OutputRefused(f"{output} holds files beam-extract did not write ({', '.join(foreign[:5])}); "
                            "nothing was changed: move them away or choose another --output")
    if overwrite:
        return before
    if not resume:
        raise OutputRefused(f"{output} holds results of an earlier run: pass --resume to continue it, --overwrite "
                            "to replace it, or choose another --output")
    return before


# The temporary directories Beam's writers leave beside the dead letters of an attempt that failed:
# WriteToText's (batch) and fileio.WriteToFiles' (streaming, without --temp_location).
BEAM_TEMPORARY = ("beam-temp-*", ".temp*")


def _beam_temporary(directory: str) -> list[str]:
    """What to delete of Beam's temporary directories under `directory`: on gs:// their objects (a
    "directory" there is only a name prefix); locally the directories themselves, empty ones too."""
    if directory.startswith("gs://"):
        return [path for name in BEAM_TEMPORARY for path in list_paths(f"{directory}/{name}/**")]
    return sorted(path for name in BEAM_TEMPORARY for path in glob.glob(f"{glob.escape(directory)}/{name}")
                  if os.path.isdir(path))


def remove_dead_letters(output: str, stages: tuple[str, ...]) -> None:
    """A resumed run reads every line again and writes their dead letters anew: the earlier runs'
    dead-letter files and Beam's temporary directories beside them (with whatever files a failed
    attempt left in them) go; nothing else there."""
    patterns = [f"{output}/dead_letter/{stage}-*.jsonl" for stage in stages]
    delete_quietly([path for pattern in patterns for path in list_paths(pattern) if ours(path, "dead_letter")]
                   + _beam_temporary(f"{output}/dead_letter"))


def remove_our_output(output: str, sites: tuple[str, ...], stages: tuple[str, ...]) -> None:
    """--overwrite: deletes what runs of ours wrote, by the names we give our files, and nothing else
    (check_output refused an output with symbolic links, so every path is inside it)."""
    kinds = {f"{output}/_committed/*": ("commit", "temporary"), f"{output}/_windows/*": ("window", "temporary"),
             f"{output}/{RUN_DIR}/*": ("skip", "temporary"),
             **{f"{output}/{site}/layer_*/*": ("part", "temporary") for site in sites}}
    delete_quietly([path for pattern, allowed in kinds.items() for path in list_paths(pattern) if ours(path, *allowed)]
                   + [f"{output}/{name}" for name in ("manifest.json", FINGERPRINT, INPUTS)
                      if FileSystems.exists(f"{output}/{name}")])
    remove_dead_letters(output, stages)


def record_fingerprint(output: str, run: dict) -> None:
    write_json(f"{output}/{FINGERPRINT}", run)


def record_inputs(output: str, now: dict, resumed: bool) -> None:
    """Records the input files for the next resumption; a run that continues another is first
    refused if its input files changed, vanished or are named otherwise (new files may be added)."""
    path = f"{output}/{INPUTS}"
    if resumed and FileSystems.exists(path):
        changed = inventory_changes(read_json(path), now)
        if changed:
            raise OutputRefused("--resume refused: the input is not the one the run resumed read: "
                                + "; ".join(changed))
    write_json(path, now)
