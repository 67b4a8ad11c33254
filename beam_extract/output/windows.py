"""Streaming progress: OUT/_windows/{start}-{end}.json for each time window, written atomically when
the window closes (the watermark passes its end), after the window's last commit.

A streaming job never ends, so it has no manifest: each window's index holds that window's counts
(lines, samples, dead letters by reason), per hook its records, tokens and files, and its commits.
"""

from __future__ import annotations

import datetime

import apache_beam as beam

from beam_extract.hooks import Hook
from beam_extract.model.config import ModelConfig
from beam_extract.output.manifest import (line_and_sample_counts, problems, relative_paths, summarize_hooks,
                                          with_normalisation_factors)
from beam_extract.output.commits import write_json
from beam_extract.output.layout import WINDOWS
from beam_extract.output.writer import window_span


def window_index(span: tuple[str, str], output: str, hooks: tuple[Hook, ...], totals: dict, config: ModelConfig,
                 norm_exclude_first: int) -> dict:
    """`totals`: the window's combined results by name; a name is missing when nothing of that kind
    happened in the window (e.g. no dead letters). Each hook's normalisation factors are the
    window's own."""
    committed = totals.get("commits") or {"commits": [], "hooks": summarize_hooks(hooks, [])}
    ids = totals.get("committed_ids", {"total": 0, "distinct": 0})
    # A resumed job reads every file again, in new windows: lines whose samples were all committed
    # before were counted by the windows that first read them, so here they are skipped, not read.
    lines = totals.get("lines", {})
    skipped = lines.get("skipped", 0)
    counts = {**line_and_sample_counts(totals.get("lines_read", 0) - skipped,
                                       {**lines, "with_samples": lines.get("with_samples", 0) - skipped},
                                       totals.get("samples", 0), totals.get("resumed", 0),
                                       totals.get("dead_letters", {})),
              "lines_skipped": skipped,
              "samples_committed_now": ids["total"], "samples_committed_twice": ids["total"] - ids["distinct"]}
    found = problems(counts, totals.get("dead_letters", {}), whole_run=False)
    return {
        "window": {"start": span[0], "end": span[1]},
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ok": not found,
        "problems": found,
        "counts": counts,
        "hooks": with_normalisation_factors(committed["hooks"], config, norm_exclude_first),
        "commits": committed["commits"],
        "batching": totals.get("batching"),
        "dead_letter_files": relative_paths(output, totals.get("dead_letter_files", [])),
    }


class WriteWindowIndex(beam.DoFn):
    """(None, {name: [the window's total]}) from a CoGroupByKey -> the window's index; yields its path."""

    def __init__(self, output: str, hooks: tuple[Hook, ...], config: ModelConfig, norm_exclude_first: int):
        self._output, self._hooks = output, hooks
        self._norms = config, norm_exclude_first

    def process(self, grouped, window=beam.DoFn.WindowParam):
        _, parts = grouped
        totals = {}
        for name, values in parts.items():
            values = list(values)
            if len(values) > 1:  # a window fires once (no late panes): more would be a wiring error
                raise ValueError(f"window {window}: {len(values)} totals of {name}")
            if values:
                totals[name] = values[0]
        span = window_span(window)
        path = f"{self._output}/{WINDOWS}/{span[0]}-{span[1]}.json"
        write_json(path, window_index(span, self._output, self._hooks, totals, *self._norms))
        yield path
