"""Who owns an output directory: the run whose output it holds (its fingerprint) and the job that
writes it now (its lock).

- OUT/_run/fingerprint.json: everything that decides which samples exist and what their activations
  are. Written by the first job on an output; a `--resume` with another fingerprint is refused,
  with each difference named.
- OUT/_run/lock.json: taken by a job before it writes anything and released when it ends. Locally
  it is created exclusively (O_EXCL); on gs:// it is an object created only if absent
  (ifGenerationMatch=0). A second job on the same output is refused with the holder's identity.
  A lock is stale, and taken over, when it names this host and a process that no longer runs (or
  a new process under a reused pid). A lock from another host or from a job on a remote runner
  is never broken automatically: delete it once you know that job has stopped.
- We never write into, or delete from, a directory that holds files no run of ours wrote.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import uuid

from apache_beam.io.filesystems import FileSystems

from beam_extract.lifetime import process_start, this_driver
from beam_extract.output.commits import TEMPORARY_SUFFIX, read_json, write_json

RUN_DIR = "_run"
FINGERPRINT = f"{RUN_DIR}/fingerprint.json"
LOCK = f"{RUN_DIR}/lock.json"


class OutputRefused(Exception):
    """The output directory cannot be used by this job; the message says why and what to do."""


# Options that change which samples exist or their activations. Everything else (batching, mesh,
# shard size, shuffling, runner flags) may differ between a run and its resumption.
FINGERPRINT_OPTIONS = ("input_format", "text_field", "max_seq_len", "views_per_task", "seed", "grid_encoder",
                       "include_answer", "dtype", "output_dtype", "exclude_special_tokens", "positions",
                       "arc_tokens")


def fingerprint(options: dict, *, weights_sha256: str, config: dict, tokenizer_sha256: str,
                hooks: list[str], template_sha256: str) -> dict:
    """The run's identity, as JSON values (compared field by field on --resume)."""
    return {
        "weights_sha256": weights_sha256,
        "config": config,
        "tokenizer_sha256": tokenizer_sha256,
        "hooks": hooks,
        "prompt_template_sha256": template_sha256,
        **{name: options[name] for name in FINGERPRINT_OPTIONS},
    }


def differences(before: dict, now: dict) -> list[str]:
    """'name: before -> now' for every field that differs (nested config fields by dotted name)."""
    found = []
    for name in sorted(before.keys() | now.keys()):
        old, new = before.get(name), now.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            found += [f"{name}.{d}" for d in differences(old, new)]
        elif old != new:
            found.append(f"{name}: {_short(old)} -> {_short(new)}")
    return found


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entries(output: str) -> list[str]:
    """Names directly under `output` (files and directories); [] if it does not exist."""
    if output.startswith("gs://"):
        from google.cloud import storage

        bucket, _, prefix = output.removeprefix("gs://").partition("/")
        prefix = f"{prefix}/" if prefix else ""
        listing = storage.Client().list_blobs(bucket, prefix=prefix, delimiter="/")
        names = [blob.name for blob in listing]  # the prefixes are known once the pages are read
        return sorted({n[len(prefix):].rstrip("/") for n in names + list(listing.prefixes)} - {""})
    return sorted(os.listdir(output)) if os.path.isdir(output) else []


def _describe(holder: dict) -> str:
    return (f"run {holder.get('run_id')} ({holder.get('runner')}) started {holder.get('started')} by pid "
            f"{holder.get('pid')} on {holder.get('host')}")


def _is_stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or holder.get("remote"):
        return False
    return process_start(int(holder.get("pid", -1))) != holder.get("pid_start")


class _Lock:
    """Create-if-absent and delete of one small object, local or gs://."""

    def __init__(self, path: str):
        self.path = path

    def create(self, content: dict) -> bool:
        data = json.dumps(content, indent=1).encode()
        if self.path.startswith("gs://"):
            from google.api_core.exceptions import PreconditionFailed

            try:
                self._blob().upload_from_string(data, if_generation_match=0)
                return True
            except PreconditionFailed:
                return False
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        return True

    def read(self) -> dict | None:
        """The holder; None if there is no lock, {} if it cannot be parsed (a killed job's half write)."""
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
        """Removes the lock only if it still holds `expected` (another job may have taken it over)."""
        if self.read() != expected:
            return False
        if self.path.startswith("gs://"):
            from google.api_core.exceptions import NotFound, PreconditionFailed

            blob = self._blob()
            try:
                blob.reload()
                blob.delete(if_generation_match=blob.generation)
            except (NotFound, PreconditionFailed):
                return False
            return True
        try:
            # Renamed aside first: of two jobs breaking the same stale lock, only one succeeds.
            aside = f"{self.path}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
            os.rename(self.path, aside)
            os.remove(aside)
            return True
        except FileNotFoundError:
            return False

    def _blob(self):
        from google.cloud import storage

        bucket, _, name = self.path.removeprefix("gs://").partition("/")
        return storage.Client().bucket(bucket).blob(name)


def take_lock(output: str, run_id: str, runner: str, remote: bool) -> dict:
    """Takes OUT/_run/lock.json for this job, or raises OutputRefused naming its holder."""
    lock = _Lock(f"{output}/{LOCK}")
    driver = this_driver()
    mine = {"run_id": run_id, "host": driver.host, "pid": driver.pid, "pid_start": driver.start, "runner": runner,
            "remote": remote,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    for _ in range(3):
        if lock.create(mine):
            return mine
        holder = lock.read()
        if holder is None:
            continue  # released meanwhile
        if holder and not _is_stale(holder):
            raise OutputRefused(f"{output} is in use by {_describe(holder)}; if that job has stopped, delete "
                                f"{lock.path} and start again")
        if not holder:
            raise OutputRefused(f"{lock.path} is unreadable; if no job writes {output}, delete it and start again")
        lock.remove_if(holder)  # stale: its process is gone
    raise OutputRefused(f"could not take {lock.path}: other jobs keep taking it")


def release_lock(output: str, held: dict) -> bool:
    return _Lock(f"{output}/{LOCK}").remove_if(held)


OURS = (RUN_DIR, "_committed", "_windows", "dead_letter", "manifest.json")


def check_output(output: str, run: dict, resume: bool, site_names: set[str]) -> dict | None:
    """Refuses an output that this job must not write into; returns the fingerprint of the run it
    holds (None for an empty or new directory). Called with the lock held."""
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
    if not resume:
        raise OutputRefused(f"{output} holds results of an earlier run: pass --resume to continue it, "
                            "or choose another --output")
    changed = differences(before, run)
    if changed:
        raise OutputRefused(f"--resume refused: {output} holds a run with other settings: " + "; ".join(changed))
    return before


def remove_dead_letters(output: str) -> None:
    """A resumed run reads every line again and writes their dead letters anew."""
    stale = [m.path for m in FileSystems.match([f"{output}/dead_letter/*"])[0].metadata_list]
    if stale:
        FileSystems.delete(stale)


def record_fingerprint(output: str, run: dict) -> None:
    write_json(f"{output}/{FINGERPRINT}", run)
