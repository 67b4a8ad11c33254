"""Streaming progress: OUT/_windows/{start}-{end}.json for each time window, written atomically when
the window closes (the watermark passes its end), after the window's last commit.

A streaming job never ends, so it has no manifest: each window's index holds that window's counts
(lines, samples, dead letters by reason), per hook its records, tokens and files, and its commits.
"""

from __future__ import annotations

import datetime

import apache_beam as beam

from beam_extract.accounting.invariants import RunTotals, problems, window_counts
from beam_extract.format.layout import WINDOWS
from beam_extract.hooks import Hook
from beam_extract.model.config import ModelConfig
from beam_extract.sink.commits import write_json
from beam_extract.sink.manifest import relative_paths, summarize_hooks, with_normalisation_factors
from beam_extract.sink.writer import window_span


def window_index(span: tuple[str, str], output: str, hooks: tuple[Hook, ...], totals: RunTotals, config: ModelConfig,
                 norm_exclude_first: int) -> dict:
    """A window's index from its totals; each hook's normalisation factors are the window's own."""
    counts = window_counts(totals)
    found = problems(counts, totals.dead_letters, whole_run=False)
    return {
        "window": {"start": span[0], "end": span[1]},
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ok": not found,
        "problems": found,
        "counts": counts,
        "hooks": with_normalisation_factors(summarize_hooks(hooks, totals.groups), config, norm_exclude_first),
        "commits": sorted(group["group"] for group in totals.groups),
        "batching": totals.batching,
        "dead_letter_files": relative_paths(output, totals.dead_letter_files),
    }


class WriteWindowIndex(beam.DoFn):
    """A window's RunTotals -> the window's index; yields its path."""

    def __init__(self, output: str, hooks: tuple[Hook, ...], config: ModelConfig, norm_exclude_first: int):
        self._output, self._hooks = output, hooks
        self._norms = config, norm_exclude_first

    def process(self, totals: RunTotals, window=beam.DoFn.WindowParam):
        span = window_span(window)
        path = f"{self._output}/{WINDOWS}/{span[0]}-{span[1]}.json"
        write_json(path, window_index(span, self._output, self._hooks, totals, *self._norms))
        yield path
