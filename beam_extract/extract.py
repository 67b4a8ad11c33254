"""The DoFn that owns the model: one load per worker process, one jitted forward per batch shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from beam_extract.batching import Batch
from beam_extract.model import Model, hook_name, load_model
from beam_extract.model.qwen2 import Hook
from beam_extract.output.schema import encode_record
from beam_extract.records.dead_letter import DeadLetter

DEAD_LETTER = "dead_letter"


@dataclasses.dataclass(frozen=True)
class ActivationRecord:
    hook_index: int  # position in the job's hook list: selects the output dataset
    n_tokens: int
    sum_l2_norm: float  # over tokens, for the manifest's normalisation statistics
    sum_squared_norm: float
    example: bytes  # serialized tf.train.Example


def batch_records(model_out: dict[Hook, np.ndarray], batch: Batch, hooks: tuple[Hook, ...],
                  output_dtype: str) -> Iterator[ActivationRecord]:
    """One record per (real row, hook), holding only the row's real tokens."""
    for row, sample in enumerate(batch.samples):
        real = batch.segment_ids[row] > 0
        for index, hook in enumerate(hooks):
            values = model_out[hook][row][real].astype(np.float32)
            squared = np.einsum("td,td->t", values, values)
            example = encode_record(
                sample_id=sample.sample_id, hook_name=hook_name(*hook), layer=hook[0], activations=values,
                token_ids=batch.tokens[row][real], positions=batch.positions[row][real],
                output_dtype=output_dtype, source=f"{sample.source}:{sample.line_number}",
                task_id=sample.task_id, augmentation=sample.augmentation,
            )
            yield ActivationRecord(index, len(values), float(np.sqrt(squared).sum()), float(squared.sum()), example)


class ExtractDoFn(beam.DoFn):
    """Batch -> ActivationRecords; a failing batch sends each of its samples to the dead letters."""

    def __init__(self, model: str, dtype: str, hooks: tuple[Hook, ...], output_dtype: str):
        self._model_name, self._dtype, self._hooks, self._output_dtype = model, dtype, hooks, output_dtype
        # One model per worker process, shared by all DoFn instances and threads in it.
        self._shared = shared.Shared()
        self._model: Model | None = None
        self._batches = Metrics.counter("extract", "batches")
        self._real_tokens = Metrics.counter("extract", "real_tokens")
        self._computed_tokens = Metrics.counter("extract", "computed_tokens")

    def setup(self):
        self._model = self._shared.acquire(lambda: load_model(self._model_name, self._dtype),
                                           tag=f"{self._model_name}|{self._dtype}")

    def process(self, batch: Batch):
        try:
            out = self._model.forward(batch.tokens, batch.positions, batch.segment_ids, self._hooks)
            out = {hook: np.asarray(value) for hook, value in out.items()}
        except Exception as error:  # e.g. device OOM: the samples are reported, the job goes on
            for sample in batch.samples:
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                    sample.source, sample.line_number, "extract", "model_error", repr(error)[:500]))
            return
        self._batches.inc()
        self._real_tokens.inc(int((batch.segment_ids > 0).sum()))
        self._computed_tokens.inc(batch.tokens.size)
        yield from batch_records(out, batch, self._hooks, self._output_dtype)
