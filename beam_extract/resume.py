"""Continuing a run (--resume): what identifies a run, and the refusal of a resumption that would
change it; what the run resumed left (`Resumed`); the skip of its committed samples; the skip file.

- The fingerprint (OUT/_run/fingerprint.json, written by the first job on an output): everything
  that decides which samples exist and what their activations are. Of our options, those options.py
  declares `fingerprinted`; the model, tokenizer, hooks and prompt template as digests and names;
  the software and device (a difference refused unless --accept_software_change); the run's
  creation date (what chat templates read), kept by every resumption and never compared. The input
  files are checked apart (ownership.record_inputs).
- The skip file OUT/_run/{run id}.skip.jsonl: the ids and digests of the samples the run resumed
  committed. The driver writes it (continue_run), the workers skip what it lists (SkipCommitted),
  the count of committed ids reads it (resumed_ids), and it is deleted once the manifest is
  written (remove_skip_file).
"""

from __future__ import annotations

import dataclasses
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_extract.format.commits import (RUN_SKIP_SUFFIX, parse_sample_id, read_groups_on_disk, read_sample_ids,
                                         select_groups, without_samples)
from beam_extract.format.storage import list_paths
from beam_extract.hooks import Hook
from beam_extract.options import OPTIONS, JobOptions
from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter
from beam_extract.sink import ownership
from beam_extract.sink.commits import delete_quietly, write_sample_ids
from beam_extract.sink.writer import remove_unlisted
from beam_extract.stages import counter
from beam_extract.tokenize import Sample, sample_digest

# Options that change which samples exist or their activations. Everything else (batching, mesh,
# shard size, shuffling, runner flags) may differ between a run and its resumption.
FINGERPRINTED = tuple(option.name for option in OPTIONS if option.fingerprinted)
# Fields of the fingerprint compared on --resume, but a difference may be accepted
# (--accept_software_change): the software and the device the activations are computed with.
SOFTWARE_FIELDS = ("software", "device")
# When the run was created: what its chat templates read as the date. A resumption keeps it, never compared.
CREATED = "created"


def fingerprint(options: JobOptions, *, weights_sha256: str, config: dict, tokenizer_sha256: str,
                hooks: list[str], template_sha256: str, software: dict, device: dict | None, created: str) -> dict:
    """The run's identity, as JSON values (compared field by field on --resume with the one
    recorded, read back from JSON: so tuples are lists here too)."""
    return json.loads(json.dumps({
        "weights_sha256": weights_sha256,
        "config": config,
        "tokenizer_sha256": tokenizer_sha256,
        "hooks": hooks,
        "prompt_template_sha256": template_sha256,
        **{name: getattr(options, name) for name in FINGERPRINTED},
        "software": software,
        "device": device,
        CREATED: created,
    }))


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


def software_differences(before: dict, now: dict) -> list[str]:
    """The differences in software and device between a recorded fingerprint and this job's."""
    return differences({k: before.get(k) for k in SOFTWARE_FIELDS}, {k: now.get(k) for k in SOFTWARE_FIELDS})


def refuse_changes(output: str, before: dict, run: dict, accept_software_change: bool) -> None:
    """Raises OutputRefused, naming each difference, unless `run` (this job's fingerprint) may
    continue the run recorded as `before` in `output`."""
    apart = set(SOFTWARE_FIELDS) | {CREATED}  # compared below, or kept from the run resumed
    changed = differences({k: v for k, v in before.items() if k not in apart},
                          {k: v for k, v in run.items() if k not in apart})
    if changed:
        raise ownership.OutputRefused(f"--resume refused: {output} holds a run with other settings: "
                                      + "; ".join(changed))
    software = software_differences(before, run)
    if software and not accept_software_change:
        raise ownership.OutputRefused(
            f"--resume refused: {output} holds a run computed with other software or on another device "
            f"({'; '.join(software)}), whose activations may differ beyond rounding; pass "
            "--accept_software_change to continue it anyway (recorded in the manifest)")


@dataclasses.dataclass(frozen=True)
class Resumed:
    """What a --resume run continues: the groups of the earlier run it keeps (without their sample
    ids), the file of those ids and digests, which workers skip, and the differences in software
    and device from that run, accepted with --accept_software_change."""

    groups: tuple[dict, ...] = ()
    skip_path: str | None = None
    software_changes: tuple[str, ...] = ()


def continue_run(output: str, run_id: str, hooks: tuple[Hook, ...], recorded: dict, run: dict,
                 dead_letter_stages: tuple[str, ...]) -> tuple[Resumed, dict]:
    """Prepares `output`, which holds the run fingerprinted `recorded`, for the job `run_id` with
    the fingerprint `run` (checked already): the run's complete groups are kept and the rest of ours
    removed, its dead letters removed (every line is read, and dead-lettered, again), and the ids
    of the samples it committed written to this job's skip file. Returns what is resumed and this
    job's fingerprint, which keeps the run's creation date (the date its prompts were rendered with;
    an older run recorded none)."""
    kept = select_groups(read_groups_on_disk(output)).kept
    remove_unlisted(output, hooks, kept)
    ownership.remove_dead_letters(output, dead_letter_stages)
    delete_quietly(list_paths(f"{output}/{ownership.RUN_DIR}/*{RUN_SKIP_SUFFIX}"))  # of killed resumptions
    skip_path = f"{output}/{ownership.RUN_DIR}/{run_id}{RUN_SKIP_SUFFIX}"
    write_sample_ids(skip_path, (pair for g in kept for pair in zip(g["samples"], g["digests"])))
    resumed = Resumed(tuple(without_samples(g) for g in kept), skip_path,
                      tuple(software_differences(recorded, run)))
    return resumed, {**run, CREATED: recorded.get(CREATED) or run[CREATED]}


def remove_skip_file(resumed: Resumed) -> None:
    """Once the manifest is written, the skip file has served (a killed job's is removed by the
    next resumption)."""
    if resumed.skip_path:
        FileSystems.delete([resumed.skip_path])


def resumed_ids(pipeline: beam.Pipeline, skip_path: str) -> beam.PCollection:
    """The ids of the samples the run resumed committed, read from the skip file on the workers."""
    return (pipeline | "ResumedIdsFile" >> beam.io.ReadFromText(skip_path)
            | "ResumedIds" >> beam.Map(lambda line: parse_sample_id(line)[0]))


RESUMED = "resumed"


def resume_decision(sample: Sample, committed: str | None):
    """A sample as --resume routes it: on if not committed before, to RESUMED if committed with
    this digest, a dead letter if committed with another (its input line changed): never skipped
    silently nor written a second time."""
    if committed is None:
        return sample
    if committed == sample_digest(sample):
        return beam.pvalue.TaggedOutput(RESUMED, sample)
    return beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
        sample.source, sample.line_number, "resume", "changed_since_commit",
        f"{sample.sample_id} was committed by the run resumed with other tokens than its input gives now",
        record_id=sample.sample_id))


def _count_resumed(results):
    for result in results:
        if isinstance(result, beam.pvalue.TaggedOutput):
            (counter("resume", "skipped_samples") if result.tag == RESUMED
             else counter("dead_letter.resume", "changed_since_commit")).inc()
        yield result


def _join_decisions(element):
    """(sample id, {"sample": [the sample], "committed": [its digest, if committed]}) -> decisions."""
    _, joined = element
    digests = list(joined["committed"])
    return _count_resumed(resume_decision(sample, digests[0] if digests else None) for sample in joined["sample"])


class _LookupCommitted(beam.DoFn):
    """Streaming's skip: samples are in time windows and committed ids are not, so they cannot meet
    in a join; every DoFn instance holds the skip file's ids (its memory grows with the run resumed)."""

    def __init__(self, skip_path: str):
        self._skip_path = skip_path

    def setup(self):
        self._done = read_sample_ids(self._skip_path)

    def process(self, sample: Sample):
        yield from _count_resumed([resume_decision(sample, self._done.get(sample.sample_id))])


class SkipCommitted(beam.PTransform):
    """With --resume: samples the resumed run committed go to the RESUMED output, not on; a changed
    one to DEAD_LETTER (see resume_decision). Their ids and digests are in one file the driver wrote
    (`skip_path`; None: nothing to skip). In batch, the file is read in byte ranges on the workers
    and joined with the samples by sample id: a worker holds one id's samples at a time, whatever
    the run's size. Outputs: `todo`, RESUMED, DEAD_LETTER."""

    def __init__(self, skip_path: str | None, streaming: bool = False):
        super().__init__()
        self._skip_path, self._streaming = skip_path, streaming

    def expand(self, samples):
        outputs = dict(main="todo")
        if not self._skip_path:
            return samples | "Pass" >> beam.Map(lambda sample: sample).with_outputs(RESUMED, DEAD_LETTER, **outputs)
        if self._streaming:
            return samples | "Lookup" >> beam.ParDo(_LookupCommitted(self._skip_path)).with_outputs(
                RESUMED, DEAD_LETTER, **outputs)
        committed = (samples.pipeline
                     | "ReadCommitted" >> beam.io.ReadFromText(self._skip_path)
                     | "ParseCommitted" >> beam.Map(parse_sample_id))
        return (
            {"sample": samples | "BySampleId" >> beam.Map(lambda sample: (sample.sample_id, sample)),
             "committed": committed}
            | "JoinCommitted" >> beam.CoGroupByKey()
            | "Decide" >> beam.FlatMap(_join_decisions).with_outputs(RESUMED, DEAD_LETTER, **outputs)
        )
