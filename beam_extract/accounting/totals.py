"""A run's results combined into one `RunTotals`: in batch once, when every write has finished; in
streaming once per window, when it closes. Every combine is distributed: counts and sums, committed
ids counted per id first (each on the worker its key goes to), never one worker holding all ids."""

from __future__ import annotations

import apache_beam as beam

from beam_extract.accounting.invariants import RunTotals
from beam_extract.format.commits import without_samples
from beam_extract.resume import resumed_ids


class SumCounts(beam.CombineFn):
    """(name, count) pairs -> {name: total}."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, pair):
        name, n = pair
        acc[name] = acc.get(name, 0) + n
        return acc

    def merge_accumulators(self, accumulators):
        merged = {}
        for acc in accumulators:
            for name, n in acc.items():
                merged[name] = merged.get(name, 0) + n
        return merged

    def extract_output(self, acc):
        return acc


class SummarizeBatches(beam.CombineFn):
    """BatchStats of every forward -> the manifest's `batching` section."""

    def create_accumulator(self):
        return {"batches": 0, "real_tokens": 0, "computed_tokens": 0, "batch_shapes": {}, "compilations": 0,
                "compile_cache_hits": 0, "compile_seconds": 0.0, "forward_seconds": 0.0}

    def add_input(self, acc, stats):
        shape = f"{stats.computed_tokens // stats.row_length}x{stats.row_length}"
        return self.merge_accumulators([acc, {
            "batches": 1, "real_tokens": stats.real_tokens, "computed_tokens": stats.computed_tokens,
            "batch_shapes": {shape: 1}, "compilations": int(bool(stats.compile_seconds)),
            "compile_cache_hits": int(stats.compile_cached), "compile_seconds": stats.compile_seconds,
            "forward_seconds": stats.forward_seconds}])

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()  # the BundleBasedDirectRunner merges empty groups too
        for acc in accumulators:
            for name, value in acc.items():
                if name == "batch_shapes":
                    for shape, n in value.items():
                        merged[name][shape] = merged[name].get(shape, 0) + n
                else:
                    merged[name] += value
        return merged

    def extract_output(self, acc):
        shapes = acc["batch_shapes"]
        return {
            "batches": acc["batches"],
            "real_tokens": acc["real_tokens"],
            "computed_tokens": acc["computed_tokens"],
            "real_over_computed": acc["real_tokens"] / acc["computed_tokens"] if acc["computed_tokens"] else None,
            "row_lengths": sorted({int(shape.split("x")[1]) for shape in shapes}),
            "batch_shapes": dict(sorted(shapes.items())),  # "rows x length" -> batches of that shape
            "compilations": acc["compilations"],  # forwards compiled or loaded from the compilation cache
            "compile_cache_hits": acc["compile_cache_hits"],  # of them, loaded
            "compile_seconds": round(acc["compile_seconds"], 3),
            "forward_seconds": round(acc["forward_seconds"], 3),  # compiling aside
        }


class TotalAndDistinct(beam.CombineFn):
    """How often each id was committed -> {"total", "distinct"}: two integers, whatever the count."""

    def create_accumulator(self):
        return 0, 0

    def add_input(self, acc, times):
        return acc[0] + times, acc[1] + 1

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return sum(a[0] for a in accumulators), sum(a[1] for a in accumulators)

    def extract_output(self, acc):
        return {"total": acc[0], "distinct": acc[1]}


def total(pcoll: beam.PCollection, label: str, combine: beam.CombineFn, streaming: bool) -> beam.PCollection:
    """The whole run's result in batch (the combine's empty result if there was no input), each
    window's in streaming (none for a window without input)."""
    combined = beam.CombineGlobally(combine)
    return pcoll | label >> (combined.without_defaults() if streaming else combined)


def count_committed(ids: beam.PCollection, streaming: bool) -> beam.PCollection:
    """Sample ids committed -> {"total", "distinct"}: a sample written twice shows as a difference.
    Counted per id first (each id on the worker its key goes to), then the counts are summed: no
    worker holds all ids."""
    per_id = ids | "CommitsPerId" >> beam.combiners.Count.PerElement() | "Times" >> beam.Values()
    return total(per_id, "CountCommitted", TotalAndDistinct(), streaming)


def committed_ids(groups: beam.PCollection, skip_path: str | None) -> beam.PCollection:
    """Every sample id the output holds: of this run's groups and, with `skip_path` (a batch
    --resume's skip file), of the run resumed."""
    ids = groups | "GroupSampleIds" >> beam.FlatMap(lambda group: group["samples"])
    if not skip_path:
        return ids
    return (ids, resumed_ids(groups.pipeline, skip_path)) | "AllCommittedIds" >> beam.Flatten()


def group_summary(group: dict) -> dict:
    """A group as the manifest keeps it: its sample count instead of its sample ids."""
    return {**without_samples(group), "samples": len(group["samples"])}


def _only(name: str, values, window) -> object:
    values = list(values)
    if len(values) > 1:  # a window fires once (no late panes): more would be a wiring error
        raise ValueError(f"window {window}: {len(values)} totals of {name}")
    return values[0]


def _window_totals(grouped, window=beam.DoFn.WindowParam) -> RunTotals:
    _, parts = grouped
    return RunTotals(**{name: _only(name, values, window) for name, values in parts.items() if values})


class TotalRun(beam.PTransform):
    """A run's raw results -> RunTotals: one for a batch run, when every input is complete; one per
    window in streaming, when the window closes (a streaming job never ends, so global side inputs
    would never be ready: each window's totals meet in a CoGroupByKey instead).

    Input: {"lines_read": lines passed on, "lines": (outcome, lines) pairs, "samples": samples to
    extract, "resumed": samples committed before, "dead_letters": (reason, count) pairs, "batching":
    BatchStats, "committed_ids": every committed sample id, "dead_letter_files": paths, "groups":
    the groups this run committed}."""

    def __init__(self, streaming: bool):
        super().__init__()
        self._streaming = streaming

    def expand(self, parts: dict[str, beam.PCollection]):
        streaming, count = self._streaming, beam.combiners.CountCombineFn
        totals = {
            "lines_read": total(parts["lines_read"], "CountLines", count(), streaming),
            "lines": total(parts["lines"], "AllFiles", SumCounts(), streaming),
            "samples": total(parts["samples"], "CountSamples", count(), streaming),
            "resumed": total(parts["resumed"], "CountResumed", count(), streaming),
            "dead_letters": total(parts["dead_letters"], "SumReasons", SumCounts(), streaming),
            "batching": total(parts["batching"], "SummarizeBatches", SummarizeBatches(), streaming),
            "committed_ids": count_committed(parts["committed_ids"], streaming),
            "dead_letter_files": total(parts["dead_letter_files"], "DeadLetterFiles",
                                       beam.combiners.ToListCombineFn(), streaming),
            "groups": total(parts["groups"] | "WithoutSampleIds" >> beam.Map(group_summary), "AllGroups",
                            beam.combiners.ToListCombineFn(), streaming),
        }
        assert set(totals) == {field.name for field in RunTotals.__dataclass_fields__.values()}
        if streaming:
            return ({name: pcoll | f"Key[{name}]" >> beam.Map(lambda value: (None, value))
                     for name, pcoll in totals.items()}
                    | "PerWindow" >> beam.CoGroupByKey()
                    | "WindowTotals" >> beam.Map(_window_totals))
        return (parts["groups"].pipeline
                | "Once" >> beam.Create([None])
                | "RunTotals" >> beam.Map(lambda _, **values: RunTotals(**values),
                                          **{name: beam.pvalue.AsSingleton(pcoll) for name, pcoll in totals.items()}))
