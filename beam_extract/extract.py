"""The DoFn that owns the model: one load per worker process, one compiled forward per batch shape."""

from __future__ import annotations

import dataclasses
import time
import logging
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from beam_extract.batching import Batch
from beam_extract.model import Model, hook_name, load_model
from beam_extract.model.qwen2 import Hook
from beam_extract.output.schema import OUTPUT_DTYPES, encode_record
from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter

_LOG = logging.getLogger(__name__)
BATCH_STATS = "batch_stats"


@dataclasses.dataclass(frozen=True)
class ActivationRecord:
    hook_index: int  # position in the job's hook list: selects the output dataset
    sample_id: str
    source: str  # input file and line, for the accounting of lines
    line_number: int
    n_tokens: int
    sum_l2_norm: float  # over tokens, for the manifest's normalisation statistics
    sum_squared_norm: float
    example: bytes  # serialized tf.train.Example


@dataclasses.dataclass(frozen=True)
class BatchStats:
    row_length: int
    real_tokens: int
    computed_tokens: int
    compile_seconds: float  # > 0 only for the batch that compiled its shape in this process
    forward_seconds: float  # wall seconds of the forward and the copy to the host, compiling aside


def pad_rows(batch: Batch, multiple: int) -> Batch:
    """Adds empty rows so the batch splits evenly over the mesh's data shards."""
    missing = -batch.tokens.shape[0] % multiple
    if not missing:
        return batch
    grow = lambda a: np.pad(a, ((0, missing), (0, 0)))  # noqa: E731
    return dataclasses.replace(batch, tokens=grow(batch.tokens), positions=grow(batch.positions),
                               segment_ids=grow(batch.segment_ids))


def batch_records(model_out: dict[Hook, np.ndarray], batch: Batch, hooks: tuple[Hook, ...],
                  output_dtype: str) -> Iterator[ActivationRecord]:
    """One record per (sample, hook), holding only the sample's selected tokens (never padding)."""
    for placement in batch.placements:
        sample, row, start = placement.sample, placement.row, placement.start
        stored = slice(None) if sample.stored is None else sample.stored
        columns = np.arange(start, start + len(sample.token_ids))[stored]
        for index, hook in enumerate(hooks):
            values = model_out[hook][row, columns]
            as_float = values.astype(np.float32)
            squared = np.einsum("td,td->t", as_float, as_float)
            example = encode_record(
                sample_id=sample.sample_id, hook_name=hook_name(*hook), layer=hook[0], activations=values,
                token_ids=sample.token_ids[stored], positions=batch.positions[row, columns],
                output_dtype=output_dtype, source=f"{sample.source}:{sample.line_number}",
                task_id=sample.task_id, augmentation=sample.augmentation,
            )
            yield ActivationRecord(index, sample.sample_id, sample.source, sample.line_number, len(values),
                                   float(np.sqrt(squared).sum()), float(squared.sum()), example)


class ExtractDoFn(beam.DoFn):
    """Batch -> its list of ActivationRecords (+ BatchStats on a tagged output); a failing batch sends
    each of its samples to the dead letters."""

    def __init__(self, model: str, dtype: str, mesh: str, hooks: tuple[Hook, ...], output_dtype: str):
        self._load = (model, dtype, mesh)
        self._hooks, self._output_dtype = hooks, output_dtype
        # One model per worker process, shared by all DoFn instances and threads in it.
        self._shared = shared.Shared()
        self._model: Model | None = None
        self._compilations = Metrics.counter("extract", "compilations")
        self._real_tokens = Metrics.counter("extract", "real_tokens")
        self._computed_tokens = Metrics.counter("extract", "computed_tokens")

    def setup(self):
        self._model = self._shared.acquire(lambda: load_model(*self._load), tag="|".join(self._load))
        _LOG.info("model %s on mesh %s (%s)", self._load[0], dict(self._model.mesh.shape),
                  self._model.mesh.devices.flat[0].platform)

    def process(self, batch: Batch):
        batch = pad_rows(batch, self._model.mesh.shape["data"])
        try:
            used_rows = max(p.row for p in batch.placements) + 1
            start = time.perf_counter()
            out, compile_seconds = self._model.forward(batch.tokens, batch.positions, batch.segment_ids,
                                                       self._hooks, OUTPUT_DTYPES[self._output_dtype], used_rows)
        except Exception as error:  # e.g. device OOM: the samples are reported, the job goes on
            for placement in batch.placements:
                sample = placement.sample
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                    sample.source, sample.line_number, "extract", "model_error", repr(error)[:500]))
            return
        forward_seconds = time.perf_counter() - start - compile_seconds
        if compile_seconds:
            self._compilations.inc()
        self._real_tokens.inc(batch.real_tokens)
        self._computed_tokens.inc(batch.tokens.size)
        yield beam.pvalue.TaggedOutput(BATCH_STATS, BatchStats(batch.tokens.shape[1], batch.real_tokens,
                                                               batch.tokens.size, compile_seconds, forward_seconds))
        yield list(batch_records(out, batch, self._hooks, self._output_dtype))  # written and committed together
