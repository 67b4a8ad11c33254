"""The DoFn that owns the model: one load per worker process, one compiled forward per batch shape."""

from __future__ import annotations

import dataclasses
import logging
import time

import apache_beam as beam
import jax
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from apache_beam.utils.windowed_value import WindowedValue

from beam_extract import progress
from beam_extract.batching import Batch, Placement
from beam_extract.faults import maybe_fail
from beam_extract.format.schema import OUTPUT_DTYPES
from beam_extract.hooks import Hook, hook_name
from beam_extract.lifetime import Driver, exit_with_driver
from beam_extract.model import compile_cache
from beam_extract.model.compile_cache import enable_compilation_cache
from beam_extract.model.loaded import Dispatched, Model, load_model
from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter
from beam_extract.sink.extracted import ExtractedBatch, StoredSample, extracted_batch
from beam_extract.tokenize import sample_digest

_LOG = logging.getLogger(__name__)
BATCH_STATS = "batch_stats"


@dataclasses.dataclass(frozen=True)
class BatchStats:
    row_length: int
    real_tokens: int
    computed_tokens: int
    compile_seconds: float  # > 0 only for the batch that compiled its shape in this process
    # Wall seconds from dispatch to the outputs on the host, compiling aside. The previous batch's
    # host work runs meanwhile, so this bounds the device's time from above.
    forward_seconds: float
    compile_cached: bool = False  # its compile was a load from the persistent compilation cache


def stored_columns(placement: Placement) -> slice | np.ndarray:
    """The row's columns holding a placed sample's stored tokens: a slice (a view of the
    activations) when they are contiguous, as they nearly always are."""
    sample, start = placement.sample, placement.start
    if sample.stored is None:
        return slice(start, start + len(sample.token_ids))
    stored = np.asarray(sample.stored)
    if stored[-1] - stored[0] + 1 == len(stored):
        return slice(start + int(stored[0]), start + int(stored[-1]) + 1)
    return start + stored


def extract_batch(activations: dict[Hook, np.ndarray], norms: dict[Hook, np.ndarray], batch: Batch,
                  hooks: tuple[Hook, ...], output_dtype: str) -> tuple[ExtractedBatch, list[DeadLetter]]:
    """A forward's host outputs -> the batch for the writer. A sample with a NaN or infinite
    activation at any hook (broken weights, an overflow) is a `non_finite` dead letter instead, at
    every hook: `norms` (see `model.loaded.token_norms`) are NaN exactly there."""
    kept, dead = [], []
    for placement in batch.placements:
        sample, columns = placement.sample, stored_columns(placement)
        broken = next((hook for hook in hooks if np.isnan(norms[hook][placement.row, columns]).any()), None)
        if broken is None:
            kept.append(StoredSample(sample, placement.row, columns, sample_digest(sample)))
        else:
            dead.append(DeadLetter(sample.source, sample.line_number, "extract", "non_finite",
                                   f"{sample.sample_id}: NaN or infinite activations at {hook_name(*broken)}",
                                   record_id=sample.sample_id))
    extracted = extracted_batch(kept, batch.positions, tuple(activations[h] for h in hooks),
                                tuple(norms[h] for h in hooks), output_dtype)
    return extracted, dead


class ExtractedBatchCoder(beam.coders.Coder):
    """Beam's own coder for Python objects (what a runner would use for this type anyway), for when
    a runner must move a batch between workers; it rarely does, as the writer is fused with the
    extraction. Runners sample element sizes for their metrics by encoding elements: this estimates
    from the arrays instead, where encoding would copy ~100 MB per sampled batch."""

    def __init__(self):
        self._objects = beam.coders.PickleCoder()

    def encode(self, value: ExtractedBatch) -> bytes:
        return self._objects.encode(value)

    def decode(self, encoded: bytes) -> ExtractedBatch:
        return self._objects.decode(encoded)

    def estimate_size(self, value: ExtractedBatch) -> int:
        return sum(a.nbytes for a in (*value.activations, *value.norms)) + 1000 * len(value.samples)

    def is_deterministic(self) -> bool:
        return False


beam.coders.registry.register_coder(ExtractedBatch, ExtractedBatchCoder)


def is_device_oom(error: BaseException) -> bool:
    """True for XLA's out-of-memory error: a `jax.errors.JaxRuntimeError` (jaxlib's
    `_jax.JaxRuntimeError`, a RuntimeError subclass; XlaRuntimeError in older jaxlibs) whose status
    is RESOURCE_EXHAUSTED, e.g. "RESOURCE_EXHAUSTED: Out of memory while trying to allocate ..."."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@dataclasses.dataclass(frozen=True)
class DeviceOutOfMemory:
    """A forward that ran out of device memory, by the first line of its error: only the text, as
    keeping the error would keep the failed forward's frames (and any device buffers they hold)
    alive, and chain later errors to it."""

    text: str


@dataclasses.dataclass(frozen=True)
class OnHost:
    """A forward whose outputs were fetched early (to free the device for a retry)."""

    dispatched_forward: Dispatched
    outputs: tuple[dict, dict]

    def __getattr__(self, name):  # compile_seconds, dispatched, compile_cached: those of the forward
        return getattr(self.dispatched_forward, name)

    def fetch(self) -> tuple[dict, dict]:
        return self.outputs


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class ExtractDoFn(beam.DoFn):
    """Batch -> its ExtractedBatch (+ BatchStats on a tagged output).

    One batch is in flight on the device while the host hands the previous one on: `process`
    dispatches its batch (JAX returns at once) and then finishes the batch before it, whose
    encoding and writing (the fused writer downstream) run while the device computes. So at most
    two batches' outputs are held; each output keeps its own batch's window and timestamp.

    A batch that runs out of device memory is split by rows into halves, recursively; each forward
    that succeeds yields its own batch and BatchStats. The samples of a row that does not fit even
    alone are `model_oom` dead letters. Any other forward error fails the job: it is a bug or a
    broken device, and dead-lettering every sample would hide it behind a job that succeeds."""

    def __init__(self, model: str, dtype: str, mesh: str, hooks: tuple[Hook, ...], output_dtype: str,
                 driver: Driver | None = None, compilation_cache_dir: str = ""):
        self._load = (model, dtype, mesh)
        self._compilation_cache = compilation_cache_dir  # "": this machine's default; "none": off
        self._driver = driver  # a local job's driver: this worker process dies with it
        self._hooks, self._output_dtype = hooks, output_dtype
        # One model per worker process, shared by all DoFn instances and threads in it.
        self._shared = shared.Shared()
        self._model: Model | None = None
        self._compilations = Metrics.counter("extract", "compilations")
        self._real_tokens = Metrics.counter("extract", "real_tokens")
        self._computed_tokens = Metrics.counter("extract", "computed_tokens")
        self._samples = Metrics.counter("extract", "samples")
        self._oom_splits = Metrics.counter("extract", "oom_splits")  # batches re-run smaller after an OOM
        self._waited = Metrics.distribution("extract", "host_wait_ms")  # host idle, waiting for the device

    def setup(self):
        exit_with_driver(self._driver)
        if self._compilation_cache != compile_cache.OFF:  # before anything compiles in this process
            enable_compilation_cache(self._compilation_cache or compile_cache.default_directory())
        self._model = self._shared.acquire(lambda: load_model(*self._load), tag="|".join(self._load))
        _LOG.info("model %s on mesh %s (%s)", self._load[0], dict(self._model.mesh.shape),
                  self._model.mesh.devices.flat[0].platform)

    def start_bundle(self):
        self._in_flight = None  # (the dispatched forward, its batch, its element's window and timestamp)
        self._device_free = 0.0  # when this thread's previous forward was on the host: the device was busy until then

    def process(self, batch: Batch, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        maybe_fail("before_forward")
        batch = batch.pad_rows(self._model.mesh.shape["data"])
        started = self._dispatch(batch), batch, WindowedValue(None, timestamp, (window,))
        previous, self._in_flight = self._in_flight, started
        if previous:
            yield from self._finish(*previous)

    def finish_bundle(self):
        last, self._in_flight = self._in_flight, None
        if last:
            yield from self._finish(*last)

    def _dispatch(self, batch: Batch) -> Dispatched | DeviceOutOfMemory:
        """The forward started on the device, or its out-of-memory error."""
        try:
            return self._model.dispatch(batch.tokens, batch.positions, batch.segment_ids, self._hooks,
                                        OUTPUT_DTYPES[self._output_dtype], batch.used_rows)
        except Exception as error:
            return self._out_of_memory(error, batch)

    def _fetch(self, started: Dispatched | OnHost, batch: Batch) -> tuple[dict, dict] | DeviceOutOfMemory:
        """The forward's host outputs (waiting for them), or its out-of-memory error."""
        if isinstance(started, OnHost):
            return started.fetch()
        began = time.perf_counter()
        try:
            outputs = started.fetch()
        except Exception as error:
            return self._out_of_memory(error, batch)
        done = time.perf_counter()
        self._waited.update(int(1000 * (done - began)))
        # At most this long on the device: from when it could start to when its outputs arrived.
        started_at = max(started.dispatched + started.compile_seconds, self._device_free)
        self._device_free = done
        progress.count(self._driver, device_seconds=done - started_at, compile_seconds=started.compile_seconds)
        return outputs

    def _bring_in_flight_home(self) -> None:
        """Fetches the forward in flight (if any) to the host, so the device holds nothing else."""
        if self._in_flight is None or isinstance(self._in_flight[0], (DeviceOutOfMemory, OnHost)):
            return
        started, batch, context = self._in_flight
        fetched = self._fetch(started, batch)
        self._in_flight = (fetched if isinstance(fetched, DeviceOutOfMemory) else OnHost(started, fetched), batch,
                           context)

    def _finish(self, started: Dispatched | OnHost | DeviceOutOfMemory, batch: Batch, context: WindowedValue):
        for output in self._outputs(started, batch):
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, context.with_value(output.value))
            else:
                yield context.with_value(output)

    def _outputs(self, started: Dispatched | OnHost | DeviceOutOfMemory, batch: Batch, alone: bool = False):
        """`alone`: nothing else is on the device (a retry)."""
        fetched = started if isinstance(started, DeviceOutOfMemory) else self._fetch(started, batch)
        if isinstance(fetched, DeviceOutOfMemory) and not alone:
            # Out of memory while the next batch may have been on the device too: that one goes to
            # the host first, and this batch is retried whole before it is split.
            self._bring_in_flight_home()
            yield from self._outputs(self._dispatch(batch), batch, alone=True)
            return
        if isinstance(fetched, DeviceOutOfMemory):
            yield from self._after_oom(batch, fetched)
            return
        activations, norms = fetched
        if started.compile_seconds:
            self._compilations.inc()
        self._real_tokens.inc(batch.real_tokens)
        self._computed_tokens.inc(batch.tokens.size)
        yield beam.pvalue.TaggedOutput(BATCH_STATS, BatchStats(
            batch.tokens.shape[1], batch.real_tokens, batch.tokens.size, started.compile_seconds,
            time.perf_counter() - started.dispatched - started.compile_seconds, started.compile_cached))
        extracted, dead = extract_batch(activations, norms, batch, self._hooks, self._output_dtype)
        self._samples.inc(len(extracted.samples))
        progress.count(self._driver, extracted=len(batch.placements), tokens=batch.real_tokens)
        for letter in dead:
            Metrics.counter("dead_letter.extract", letter.reason).inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, letter)
        if extracted.samples:
            yield extracted  # written and committed together

    @staticmethod
    def _out_of_memory(error: Exception, batch: Batch) -> DeviceOutOfMemory:
        """An out-of-memory error as DeviceOutOfMemory; any other error fails the bundle, naming the batch."""
        if not is_device_oom(error):
            ids = [p.sample.sample_id for p in batch.placements]
            raise RuntimeError(
                f"the forward failed on a batch of shape {tuple(batch.tokens.shape)} with {len(ids)} "
                f"samples ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}): {_first_line(error)}"
            ) from error
        # Not retried here: inside the handler the failed forward's frames would stay alive.
        return DeviceOutOfMemory(_first_line(error))

    def _after_oom(self, batch: Batch, oom: DeviceOutOfMemory):
        """Re-runs an out-of-memory batch in smaller pieces, one at a time; a lone row that still
        does not fit (in a batch no larger than one row padded for the mesh) dead-letters its
        samples."""
        multiple = self._model.mesh.shape["data"]
        if batch.used_rows > 1 or batch.tokens.shape[0] > multiple:
            pieces = batch.halves(multiple)
            self._oom_splits.inc()
            _LOG.warning("out of device memory on a batch of shape %s (%d used rows): re-running it as %s",
                         tuple(batch.tokens.shape), batch.used_rows, [tuple(p.tokens.shape) for p in pieces])
            for piece in pieces:
                yield from self._outputs(self._dispatch(piece), piece, alone=True)
            return
        row_length = batch.tokens.shape[1]
        for placement in batch.placements:
            sample = placement.sample
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                sample.source, sample.line_number, "extract", "model_oom",
                f"sample {sample.sample_id} ({len(sample.token_ids)} tokens) in a row of {row_length} tokens "
                f"does not fit in device memory even as a batch of {batch.tokens.shape[0]} row(s): "
                f"{oom.text}"[:500], record_id=sample.sample_id))
