"""What a run's counts are and which invariants `ok` stands for: pure functions over its totals,
shared by the manifest (the whole run) and the streaming window indexes."""

from __future__ import annotations

import dataclasses

# Dead-letter reasons of whole input files that lost lines (`not_a_file` lost none: it was never input).
LOST_LINES = ("truncated_file", "corrupt_file", "unreadable_file", "bad_file_name", "expansion_too_large")


@dataclasses.dataclass(frozen=True)
class RunTotals:
    """The combined results of a run, or of one streaming window (a kind that did not happen in a
    window has its empty value)."""

    lines_read: int = 0  # lines passed on by the readers (blank ones are counted in `lines` instead)
    lines: dict = dataclasses.field(default_factory=dict)  # with_samples, dead_lettered, skipped, blank
    samples: int = 0  # produced now and not committed before
    resumed: int = 0  # produced now and committed by the run resumed
    dead_letters: dict = dataclasses.field(default_factory=dict)  # {reason: count}
    batching: dict | None = None  # accounting.totals.SummarizeBatches
    committed_ids: dict = dataclasses.field(default_factory=lambda: {"total": 0, "distinct": 0})
    dead_letter_files: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)  # this run's accepted groups, without sample ids

    @property
    def committed_now(self) -> int:
        return sum(group["samples"] for group in self.groups)


def line_and_sample_counts(lines_read: int, lines: dict[str, int], samples: int, resumed: int,
                           dead_letters: dict[str, int]) -> dict:
    """The accounting of a run (manifest) or of a streaming window (its index). `lines_read` counts
    the lines passed on, `lines["blank"]` the blank ones the reader counted instead."""
    with_samples, dead_lettered = lines.get("with_samples", 0), lines.get("dead_lettered", 0)
    blank = lines.get("blank", 0)
    return {
        "lines_read": lines_read + blank,
        "lines_with_samples": with_samples,
        "lines_dead_lettered": dead_lettered,
        "lines_blank": blank,
        "lines_unaccounted": lines_read - with_samples - dead_lettered,
        "samples": samples + resumed,
        "samples_extracted_now": samples,
        "samples_resumed": resumed,
        "dead_letters": dict(sorted(dead_letters.items())),
        "dead_lettered": sum(dead_letters.values()),
    }


def run_counts(totals: RunTotals) -> dict:
    """The manifest's `counts`: lines and samples of this run; committed samples of the whole output
    (this run's groups and those of the run it resumed)."""
    ids = totals.committed_ids
    return {**line_and_sample_counts(totals.lines_read, totals.lines, totals.samples, totals.resumed,
                                     totals.dead_letters),
            "samples_committed": ids.get("distinct", 0),
            "samples_committed_now": totals.committed_now,
            "samples_committed_twice": ids.get("total", 0) - ids.get("distinct", 0)}


def window_counts(totals: RunTotals) -> dict:
    """A streaming window's `counts`. A resumed job reads every file again, in new windows: lines
    whose samples were all committed before were counted by the windows that first read them, so
    here they are skipped, not read."""
    ids, lines = totals.committed_ids, totals.lines
    skipped = lines.get("skipped", 0)
    return {**line_and_sample_counts(totals.lines_read - skipped,
                                     {**lines, "with_samples": lines.get("with_samples", 0) - skipped},
                                     totals.samples, totals.resumed, totals.dead_letters),
            "lines_skipped": skipped,
            "samples_committed_now": ids["total"], "samples_committed_twice": ids["total"] - ids["distinct"]}


def problems(counts: dict, dead_letters: dict, whole_run: bool = True) -> list[str]:
    """The invariants, checked: each one that fails, in words (none: ok). A streaming window
    (`whole_run` False) is checked on its own lines and this run's commits; a whole run also on
    everything committed, by it and by the run it resumed. A `model_oom` sample is a dead letter,
    not a loss: it is extracted but not committed."""
    found = []
    oom, broken = dead_letters.get("model_oom", 0), dead_letters.get("non_finite", 0)
    changed = dead_letters.get("changed_since_commit", 0)
    if broken:
        found.append(f"{broken} samples had NaN or infinite activations (non_finite dead letters): check the weights")
    failed = oom + broken  # extracted, then dead-lettered: not committed
    if counts["lines_unaccounted"]:
        found.append(f"{counts['lines_unaccounted']} lines read are neither written, dead-lettered nor blank")
    if lost := sum(dead_letters.get(reason, 0) for reason in LOST_LINES):
        found.append(f"{lost} input files were not read to their end (see the read dead letters)")
    if counts["samples_extracted_now"] != counts["samples_committed_now"] + failed:
        found.append(f"{counts['samples_extracted_now']} samples extracted but {counts['samples_committed_now']} "
                     f"committed by this run{f' and {failed} dead-lettered by the extraction' if failed else ''}")
    if counts["samples_committed_twice"]:
        found.append(f"{counts['samples_committed_twice']} samples committed more than once")
    if changed:
        found.append(f"{changed} samples committed by the run resumed no longer match their input "
                     "(changed_since_commit dead letters)")
    if not whole_run:
        return found
    if counts["samples_committed"] != counts["samples"] - failed + changed:
        found.append(f"{counts['samples_committed']} samples committed for {counts['samples'] - failed} produced "
                     "from this input (the resumed run committed samples of other input)")
    if not counts["samples_committed"]:
        found.append("no sample was written")
    return found
