"""The DoFn that owns the model: one load per worker process, one compiled forward per batch shape."""

from __future__ import annotations

import dataclasses
import time
import logging
from collections.abc import Iterator

import apache_beam as beam
import jax
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from beam_extract.batching import Batch
from beam_extract.lifetime import Driver, exit_with_driver
from beam_extract.model import Model, hook_name, load_model
from beam_extract.model.qwen2 import Hook
from beam_extract.output.schema import OUTPUT_DTYPES, encode_record
from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter
from beam_extract.tokenize import sample_digest

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
    digest: str = ""  # tokenize.sample_digest of the sample, recorded with its commit


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
                  output_dtype: str) -> Iterator[ActivationRecord | DeadLetter]:
    """One record per (sample, hook), holding only the sample's selected tokens (never padding). A
    sample with a NaN or infinite activation at any hook (broken weights, an overflow) is a
    `non_finite` dead letter instead, at every hook."""
    for placement in batch.placements:
        sample, row, start = placement.sample, placement.row, placement.start
        stored = slice(None) if sample.stored is None else sample.stored
        columns = np.arange(start, start + len(sample.token_ids))[stored]
        values = [model_out[hook][row, columns] for hook in hooks]
        as_float = [v.astype(np.float32) for v in values]
        broken = next((hook for hook, v in zip(hooks, as_float) if not np.isfinite(v).all()), None)
        if broken is not None:
            yield DeadLetter(sample.source, sample.line_number, "extract", "non_finite",
                             f"{sample.sample_id}: NaN or infinite activations at {hook_name(*broken)}",
                             record_id=sample.sample_id)
            continue
        digest = sample_digest(sample)
        for index, (hook, value, floats) in enumerate(zip(hooks, values, as_float)):
            squared = np.einsum("td,td->t", floats, floats)
            example = encode_record(
                sample_id=sample.sample_id, hook_name=hook_name(*hook), layer=hook[0], activations=value,
                token_ids=sample.token_ids[stored], positions=batch.positions[row, columns],
                output_dtype=output_dtype, source=f"{sample.source}:{sample.line_number}",
                task_id=sample.task_id, doc_id=sample.doc_id, augmentation=sample.augmentation,
            )
            yield ActivationRecord(index, sample.sample_id, sample.source, sample.line_number, len(value),
                                   float(np.sqrt(squared).sum()), float(squared.sum()), example, digest)


def is_device_oom(error: BaseException) -> bool:
    """True for XLA's out-of-memory error: a `jax.errors.JaxRuntimeError` (jaxlib's
    `_jax.JaxRuntimeError`, a RuntimeError subclass; XlaRuntimeError in older jaxlibs) whose status
    is RESOURCE_EXHAUSTED, e.g. "RESOURCE_EXHAUSTED: Out of memory while trying to allocate ..."."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def used_rows(batch: Batch) -> int:
    """Rows up to the last one holding a sample; the rest are padding."""
    return max(p.row for p in batch.placements) + 1


def batch_rows(batch: Batch, first: int, stop: int, multiple: int) -> Batch:
    """Rows [first, stop) of a batch as a batch of their own, with their placements re-indexed,
    padded to a multiple of `multiple` rows."""
    placements = tuple(dataclasses.replace(p, row=p.row - first) for p in batch.placements
                       if first <= p.row < stop)
    return pad_rows(Batch(placements, batch.tokens[first:stop], batch.positions[first:stop],
                          batch.segment_ids[first:stop]), multiple)


def split_batch(batch: Batch, multiple: int) -> list[Batch]:
    """The used rows in two halves (one batch when only one row is used), each padded to a multiple
    of `multiple` rows."""
    used = used_rows(batch)
    if used == 1:
        return [batch_rows(batch, 0, 1, multiple)]
    half = (used + 1) // 2
    return [batch_rows(batch, 0, half, multiple), batch_rows(batch, half, used, multiple)]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class ExtractDoFn(beam.DoFn):
    """Batch -> its list of ActivationRecords (+ BatchStats on a tagged output).

    A batch that runs out of device memory is split by rows into halves, recursively; each forward
    that succeeds yields its own list and BatchStats. The samples of a row that does not fit even
    alone are `model_oom` dead letters. Any other forward error fails the job: it is a bug or a
    broken device, and dead-lettering every sample would hide it behind a job that succeeds."""

    def __init__(self, model: str, dtype: str, mesh: str, hooks: tuple[Hook, ...], output_dtype: str,
                 driver: Driver | None = None):
        self._load = (model, dtype, mesh)
        self._driver = driver  # a local job's driver: this worker process dies with it
        self._hooks, self._output_dtype = hooks, output_dtype
        # One model per worker process, shared by all DoFn instances and threads in it.
        self._shared = shared.Shared()
        self._model: Model | None = None
        self._compilations = Metrics.counter("extract", "compilations")
        self._real_tokens = Metrics.counter("extract", "real_tokens")
        self._computed_tokens = Metrics.counter("extract", "computed_tokens")
        self._oom_splits = Metrics.counter("extract", "oom_splits")  # batches re-run smaller after an OOM

    def setup(self):
        exit_with_driver(self._driver)
        self._model = self._shared.acquire(lambda: load_model(*self._load), tag="|".join(self._load))
        _LOG.info("model %s on mesh %s (%s)", self._load[0], dict(self._model.mesh.shape),
                  self._model.mesh.devices.flat[0].platform)

    def process(self, batch: Batch):
        yield from self._extract(pad_rows(batch, self._model.mesh.shape["data"]))

    def _extract(self, batch: Batch):
        rows = used_rows(batch)
        oom = ""
        start = time.perf_counter()
        try:
            out, compile_seconds = self._model.forward(batch.tokens, batch.positions, batch.segment_ids,
                                                       self._hooks, OUTPUT_DTYPES[self._output_dtype], rows)
        except Exception as error:
            if not is_device_oom(error):
                ids = [p.sample.sample_id for p in batch.placements]
                raise RuntimeError(
                    f"the forward failed on a batch of shape {tuple(batch.tokens.shape)} with {len(ids)} "
                    f"samples ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}): {_first_line(error)}"
                ) from error
            # Only its text: retrying inside this block would keep the failed forward's frames (and
            # any device buffers they hold) alive, and chain later errors to this one.
            oom = _first_line(error)
        if oom:
            yield from self._after_oom(batch, rows, oom)
            return
        forward_seconds = time.perf_counter() - start - compile_seconds
        if compile_seconds:
            self._compilations.inc()
        self._real_tokens.inc(batch.real_tokens)
        self._computed_tokens.inc(batch.tokens.size)
        yield beam.pvalue.TaggedOutput(BATCH_STATS, BatchStats(batch.tokens.shape[1], batch.real_tokens,
                                                               batch.tokens.size, compile_seconds, forward_seconds))
        records = []
        for result in batch_records(out, batch, self._hooks, self._output_dtype):
            if isinstance(result, DeadLetter):
                Metrics.counter("dead_letter.extract", result.reason).inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, result)
            else:
                records.append(result)
        if records:
            yield records  # written and committed together

    def _after_oom(self, batch: Batch, rows: int, oom: str):
        """Re-runs an out-of-memory batch in smaller pieces; a lone row that still does not fit (in
        a batch no larger than one row padded for the mesh) dead-letters its samples."""
        multiple = self._model.mesh.shape["data"]
        if rows > 1 or batch.tokens.shape[0] > multiple:  # the smallest batch: one row, padded for the mesh
            pieces = split_batch(batch, multiple)
            self._oom_splits.inc()
            _LOG.warning("out of device memory on a batch of shape %s (%d used rows): re-running it as %s",
                         tuple(batch.tokens.shape), rows, [tuple(p.tokens.shape) for p in pieces])
            for piece in pieces:
                yield from self._extract(piece)
            return
        row_length = batch.tokens.shape[1]
        for placement in batch.placements:
            sample = placement.sample
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                sample.source, sample.line_number, "extract", "model_oom",
                f"sample {sample.sample_id} ({len(sample.token_ids)} tokens) in a row of {row_length} tokens "
                f"does not fit in device memory even as a batch of {batch.tokens.shape[0]} row(s): "
                f"{oom}"[:500], record_id=sample.sample_id))
