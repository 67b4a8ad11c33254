"""ExtractDoFn's failure policy for the forward: a device out-of-memory splits the batch by rows
(down to one row, whose samples are then `model_oom` dead letters); any other error fails the job."""

from __future__ import annotations

import time
import types

import jax
import numpy as np
import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow

from beam_extract.batching import assemble
from beam_extract.extract import BATCH_STATS, ExtractDoFn
from beam_extract.format.schema import decode_record
from beam_extract.hooks import hook_name
from beam_extract.model.loaded import Dispatched
from beam_extract.records.dead_letter import DEAD_LETTER
from beam_extract.tokenize import Sample

HOOKS = ((0, "resid_post"), (1, "mlp_out"))
ROW_LENGTH = 16


def oom() -> jax.errors.JaxRuntimeError:
    # jaxlib's own class, built from Python (a real CPU OOM raises it too: see test_what_counts_as_out_of_memory).
    return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1234 bytes.")


class LateErrors:
    """A dispatched forward whose error surfaces when its outputs are fetched, as XLA's asynchronous
    dispatch reports errors of the computation itself."""

    def __init__(self, error: Exception):
        self.error, self.compile_seconds, self.dispatched = error, 0.0, time.perf_counter()

    def fetch(self):
        raise self.error


class FakeModel:
    """Model.dispatch's contract without a model: [rows, S, d] per hook, values from each token and
    its position only (as a real model's activations depend only on the sample). Raises a device OOM
    when the batch computes more than `max_rows` rows or holds a sample longer than
    `max_sample_tokens`: at dispatch, or with `late` when the outputs are fetched."""

    def __init__(self, data: int = 1, max_rows: int | None = None, max_sample_tokens: int | None = None,
                 error: Exception | None = None, error_for: str | None = None, late: bool = False):
        self.mesh = types.SimpleNamespace(shape={"data": data})
        self.max_rows, self.max_sample_tokens = max_rows, max_sample_tokens
        self.error, self.error_for = error, error_for  # error_for: raise only for batches with this sample
        self.late = late
        self.calls: list[tuple[int, int]] = []  # (batch rows, used rows)

    def dispatch(self, tokens, positions, segment_ids, hooks, out_dtype=np.float32, rows=None):
        try:
            out = self.forward(tokens, positions, segment_ids, hooks, out_dtype, rows)
        except Exception as error:
            if self.late:
                return LateErrors(error)
            raise
        norms = {hook: np.linalg.norm(v.astype(np.float32), axis=-1) for hook, v in out.items()}
        return Dispatched(out, norms, rows, 0.0, time.perf_counter())

    def forward(self, tokens, positions, segment_ids, hooks, out_dtype=np.float32, rows=None):
        assert tokens.shape == positions.shape == segment_ids.shape
        assert tokens.shape[0] % self.mesh.shape["data"] == 0, "rows must split over the data shards"
        self.calls.append((tokens.shape[0], rows))
        if self.max_rows is not None and tokens.shape[0] > self.max_rows:
            raise oom()
        if self.error is not None and (self.error_for is None or self.error_for in self._ids(tokens)):
            raise self.error
        if self.max_sample_tokens is not None:
            longest = max(np.bincount(row[row > 0]).max(initial=0) for row in segment_ids[:rows])
            if longest > self.max_sample_tokens:
                raise oom()
        base = tokens[:rows, :, None] * 1000.0 + positions[:rows, :, None]
        return {hook: (base * (i + 1) + np.arange(4)).astype(out_dtype) for i, hook in enumerate(hooks)}

    @staticmethod
    def _ids(tokens):
        return {f"s{t // 100}" for t in np.unique(tokens) if t}


class Counter:
    def __init__(self):
        self.value = 0

    def inc(self, n=1):
        self.value += n


def sample(i: int, n: int) -> Sample:
    # Token ids encode the sample (i * 100 + k), so FakeModel can tell which samples a batch holds.
    return Sample(f"s{i}", (i * 100 + np.arange(1, n + 1)).astype(np.int32), "in.jsonl", i + 1)


def dofn_with(model, hooks=HOOKS) -> ExtractDoFn:
    dofn = ExtractDoFn("unused", "float32", "auto", hooks, "float32")
    dofn._model = model  # instead of setup(): no model is loaded
    dofn._oom_splits = Counter()
    return dofn


def outputs(dofn, *batches):
    """What a bundle of these batches yields, unwrapped from their WindowedValues (each output is
    in its own batch's window and timestamp: checked here)."""
    dofn.start_bundle()
    results = []
    for batch in batches:
        results += dofn.process(batch, timestamp=len(results), window=GlobalWindow())
    for out in [*results, *dofn.finish_bundle()]:
        tagged = isinstance(out, TaggedOutput)
        windowed = out.value if tagged else out
        assert windowed.windows == (GlobalWindow(),)
        yield TaggedOutput(out.tag, windowed.value) if tagged else windowed.value


def run(dofn, batch):
    """(extracted batches, BatchStats, dead letters) from one batch."""
    lists, stats, dead = [], [], []
    for out in outputs(dofn, batch):
        if isinstance(out, TaggedOutput):
            {BATCH_STATS: stats, DEAD_LETTER: dead}[out.tag].append(out.value)
        else:
            lists.append(out)
    return lists, stats, dead


def records(extracted, hooks=HOOKS) -> list[tuple[str, int, bytes]]:
    """(sample id, hook index, record bytes) of an ExtractedBatch."""
    return [(stored.sample.sample_id, index, data) for index, hook in enumerate(hooks)
            for stored, data in zip(extracted.samples, extracted.records(index, hook_name(*hook), hook[0]))]


def key(record):
    return record[:2]


def eight_rows():
    """8 rows of 16 tokens: singles and packed pairs, 11 samples."""
    rows = [[sample(1, 16)], [sample(2, 9), sample(3, 7)], [sample(4, 12)], [sample(5, 3), sample(6, 5)],
            [sample(7, 16)], [sample(8, 1)], [sample(9, 8), sample(10, 8)], [sample(11, 14)]]
    return rows, assemble(rows, 8, ROW_LENGTH)


def test_the_oom_split_counter_is_a_beam_metric():
    counter = ExtractDoFn("unused", "float32", "auto", HOOKS, "float32")._oom_splits
    assert (counter.metric_name.namespace, counter.metric_name.name) == ("extract", "oom_splits")


@pytest.mark.parametrize("late", [False, True], ids=["at-dispatch", "at-fetch"])
def test_an_oom_splits_the_batch_until_it_fits(late):
    rows, batch = eight_rows()
    expected, expected_stats, _ = run(dofn_with(FakeModel()), batch)
    assert len(expected) == 1 and len(expected_stats) == 1

    model = FakeModel(max_rows=2, late=late)
    dofn = dofn_with(model)
    lists, stats, dead = run(dofn, batch)

    assert dead == []
    # 8 fails, is retried whole once (the next batch may have held the device), then 8 -> 4 + 4 ->
    # four forwards of 2 rows each; every sample written exactly once.
    assert model.calls == [(8, 8), (8, 8), (4, 4), (2, 2), (2, 2), (4, 4), (2, 2), (2, 2)]
    assert dofn._oom_splits.value == 3
    assert len(lists) == 4 and all(batch.samples for batch in lists)
    written = [r for batch in lists for r in records(batch)]
    assert sorted(map(key, written)) == sorted({(s.sample_id, h) for row in rows for s in row for h in (0, 1)})
    assert sorted(written) == sorted(records(expected[0]))  # same activations, same bytes
    # Each batch holds the samples of its own sub-forward: rows 0-1, 2-3, 4-5, 6-7.
    assert [sorted({r[0] for r in records(batch)}) for batch in lists] == [
        sorted(s.sample_id for row in rows[i : i + 2] for s in row) for i in range(0, 8, 2)]
    # One BatchStats per successful sub-forward, together accounting for every real token.
    assert len(stats) == 4
    assert [(s.row_length, s.computed_tokens) for s in stats] == [(ROW_LENGTH, 2 * ROW_LENGTH)] * 4
    assert sum(s.real_tokens for s in stats) == expected_stats[0].real_tokens == batch.real_tokens


def test_sub_batches_are_padded_for_the_data_shards():
    rows = [[sample(i, 4 + i)] for i in range(5)]
    model = FakeModel(data=2, max_rows=2)  # FakeModel asserts every batch splits over 2 shards
    lists, stats, dead = run(dofn_with(model), assemble(rows, 5, ROW_LENGTH))  # padded to 6 rows
    assert dead == []
    # 6 rows (5 used) -> rows 0-2 padded to 4 + rows 3-4; rows 0-2 -> rows 0-1 + row 2 padded to 2.
    assert model.calls == [(6, 5), (6, 5), (4, 3), (2, 2), (2, 1), (2, 2)]
    assert sorted(s.sample.sample_id for batch in lists for s in batch.samples) == [f"s{i}" for i in range(5)]
    assert [s.computed_tokens for s in stats] == [2 * ROW_LENGTH] * 3


def test_a_lone_used_row_in_a_padded_batch_is_retried_without_the_padding():
    model = FakeModel(max_rows=1)
    dofn = dofn_with(model)
    lists, stats, dead = run(dofn, assemble([[sample(1, 5)]], 4, ROW_LENGTH))
    assert dead == [] and model.calls == [(4, 1), (4, 1), (1, 1)] and dofn._oom_splits.value == 1
    assert [key(r) for r in records(lists[0])] == [("s1", 0), ("s1", 1)]
    assert [s.computed_tokens for s in stats] == [ROW_LENGTH]


def test_a_row_that_never_fits_dead_letters_its_samples_as_model_oom():
    rows = [[sample(1, 13)], [sample(2, 4), sample(3, 4)], [sample(4, 11), sample(5, 5)], [sample(6, 10)],
            [sample(7, 2)], [sample(8, 9), sample(9, 7)], [sample(10, 12)], [sample(11, 6)]]
    model = FakeModel(max_rows=4, max_sample_tokens=10)
    dofn = dofn_with(model)
    lists, stats, dead = run(dofn, assemble(rows, 8, ROW_LENGTH))

    # Rows 0, 2 and 6 hold a sample of more than 10 tokens: each fails alone, its samples (s5 too,
    # packed with s4) are dead letters; every other sample is written exactly once.
    assert sorted((d.line_number, d.stage, d.reason) for d in dead) == [
        (2, "extract", "model_oom"), (5, "extract", "model_oom"), (6, "extract", "model_oom"),
        (11, "extract", "model_oom")]
    details = {d.line_number: d.detail for d in dead}
    for i, n in ((1, 13), (4, 11), (5, 5), (10, 12)):
        assert f"sample s{i} ({n} tokens)" in details[i + 1]
        assert f"row of {ROW_LENGTH} tokens" in details[i + 1] and "RESOURCE_EXHAUSTED" in details[i + 1]
    written = [r for batch in lists for r in records(batch)]
    assert sorted(map(key, written)) == sorted((f"s{i}", h) for i in (2, 3, 6, 7, 8, 9, 11) for h in (0, 1))
    assert all(s.computed_tokens <= 4 * ROW_LENGTH for s in stats) and len(stats) == len(lists)
    assert sum(s.real_tokens for s in stats) == sum(len(s.token_ids) for i in (1, 3, 4, 5, 7) for s in rows[i])


@pytest.mark.parametrize("error", [ValueError("bad config"),
                                   jax.errors.JaxRuntimeError("INTERNAL: Failed to launch a kernel\nsecond line")],
                         ids=["ValueError", "JaxRuntimeError-INTERNAL"])
def test_any_other_forward_error_fails_the_job(error):
    _, batch = eight_rows()
    results = []
    with pytest.raises(RuntimeError) as raised:
        for output in outputs(dofn_with(FakeModel(error=error)), batch):
            results.append(output)
    assert results == []  # no dead letters, no records
    assert raised.type is RuntimeError and raised.value.__cause__ is error
    message = str(raised.value)
    assert "(8, 16)" in message and "11 samples" in message and "s1, s2, s3" in message and "s4" not in message
    assert str(error).splitlines()[0] in message and "second line" not in message


@pytest.mark.parametrize("late", [False, True], ids=["at-dispatch", "at-fetch"])
def test_a_non_oom_error_after_a_split_still_fails_the_job(late):
    _, batch = eight_rows()
    model = FakeModel(max_rows=4, error=jax.errors.JaxRuntimeError("INTERNAL: device lost"), error_for="s7",
                      late=late)
    results = []
    expected = r"shape \(4, 16\) with 5 samples \(s7, s8, s9, \.\.\.\): JaxRuntimeError: INTERNAL: device lost$"
    with pytest.raises(RuntimeError, match=expected) as raised:
        for output in outputs(dofn_with(model), batch):
            results.append(output)
    assert isinstance(raised.value.__cause__, jax.errors.JaxRuntimeError)
    assert not any(isinstance(o, TaggedOutput) and o.tag == DEAD_LETTER for o in results)


def test_the_next_batch_is_dispatched_before_the_previous_one_is_finished():
    """The device computes batch n+1 while the host finishes batch n; each output keeps its own
    batch's window and timestamp, and the bundle's last batch is finished with the bundle."""
    from apache_beam.transforms.window import IntervalWindow

    events = []

    class Recording(FakeModel):
        def dispatch(self, tokens, *args):
            name = f"s{tokens[0, 0] // 100}"
            events.append(("dispatch", name))
            started = super().dispatch(tokens, *args)
            fetch = started.fetch
            return types.SimpleNamespace(compile_seconds=0.0, compile_cached=False, dispatched=started.dispatched,
                                         fetch=lambda: events.append(("fetch", name)) or fetch())

    dofn = dofn_with(Recording())
    dofn.start_bundle()
    windows = IntervalWindow(0, 10), IntervalWindow(10, 20)
    first = list(dofn.process(assemble([[sample(1, 5)]], 1, ROW_LENGTH), timestamp=3, window=windows[0]))
    assert first == [] and events == [("dispatch", "s1")]
    second = list(dofn.process(assemble([[sample(2, 5)]], 1, ROW_LENGTH), timestamp=13, window=windows[1]))
    assert events == [("dispatch", "s1"), ("dispatch", "s2"), ("fetch", "s1")]
    last = list(dofn.finish_bundle())
    assert events[-1] == ("fetch", "s2")
    for outputs_, window, timestamp, name in ((second, windows[0], 3, "s1"), (last, windows[1], 13, "s2")):
        assert len(outputs_) == 2  # BatchStats and the batch
        for out in outputs_:
            windowed = out.value if isinstance(out, TaggedOutput) else out
            assert windowed.windows == (window,) and windowed.timestamp == timestamp
        assert [s.sample.sample_id for s in outputs_[-1].value.samples] == [name]


class DeviceOfRows(FakeModel):
    """A device that holds `capacity` rows of outputs until they are fetched: each batch fits alone,
    not while another is in flight. Out of memory at dispatch, or with `late` at fetch."""

    def __init__(self, capacity: int, late: bool = False):
        super().__init__(late=late)
        self.capacity, self.held = capacity, 0

    def dispatch(self, tokens, positions, segment_ids, hooks, out_dtype=np.float32, rows=None):
        if self.held + tokens.shape[0] > self.capacity:
            self.calls.append((tokens.shape[0], rows))
            if self.late:
                return LateErrors(oom())
            raise oom()
        started = super().dispatch(tokens, positions, segment_ids, hooks, out_dtype, rows)
        self.held += tokens.shape[0]
        fetch = started.fetch

        def fetch_and_free():
            self.held -= tokens.shape[0]
            return fetch()

        return types.SimpleNamespace(compile_seconds=0.0, compile_cached=False, dispatched=started.dispatched,
                                     fetch=fetch_and_free)


@pytest.mark.parametrize("late", [False, True], ids=["at-dispatch", "at-fetch"])
def test_a_batch_that_fits_alone_is_never_split_or_dead_lettered_for_the_one_in_flight(late):
    batches = [assemble([[sample(10 * b + r, 8)] for r in range(8)], 8, ROW_LENGTH) for b in range(4)]
    model = DeviceOfRows(capacity=8, late=late)
    dofn = dofn_with(model)
    results = list(outputs(dofn, *batches))
    written = [s.sample.sample_id for out in results if not isinstance(out, TaggedOutput) for s in out.samples]
    dead = [out.value for out in results if isinstance(out, TaggedOutput) and out.tag == DEAD_LETTER]
    assert dead == [] and dofn._oom_splits.value == 0
    assert sorted(written) == sorted(f"s{10 * b + r}" for b in range(4) for r in range(8))
    assert all(rows == 8 for rows, _ in model.calls)  # whole batches, retried once each at most


def test_what_counts_as_out_of_memory():
    from beam_extract.extract import is_device_oom

    # A real XLA out-of-memory (on CPU: an allocation past the address space fails at once).
    with pytest.raises(jax.errors.JaxRuntimeError) as real:
        jax.jit(lambda: jax.numpy.ones((2**50,), jax.numpy.int8))().block_until_ready()
    assert str(real.value).startswith("RESOURCE_EXHAUSTED") and is_device_oom(real.value)
    assert is_device_oom(oom())
    assert not is_device_oom(jax.errors.JaxRuntimeError("INTERNAL: Failed to launch a kernel"))
    assert not is_device_oom(RuntimeError("RESOURCE_EXHAUSTED: not from XLA"))
    assert not is_device_oom(MemoryError())


class SplittingModel:
    """The real model, but batches of more than `max_rows` rows run out of memory."""

    def __init__(self, model, max_rows: int):
        self.mesh, self._model, self.max_rows = model.mesh, model, max_rows
        self.calls = []

    def dispatch(self, tokens, *args):
        self.calls.append(tokens.shape[0])
        if tokens.shape[0] > self.max_rows:
            raise oom()
        return self._model.dispatch(tokens, *args)


def test_split_records_equal_unsplit_records_with_the_real_model():
    from beam_extract.model.loaded import load_model

    model = load_model("tiny-random-qwen2", "float32", "auto")
    rows = [[sample(1, 16)], [sample(2, 9), sample(3, 7)], [sample(4, 12)], [sample(5, 3), sample(6, 5)],
            [sample(7, 16)], [sample(8, 1)]]
    batch = assemble(rows, 6, ROW_LENGTH)
    data = model.mesh.shape["data"]
    whole, _, _ = run(dofn_with(model, ((0, "resid_post"), (3, "mlp_out"))), batch)
    splitting = SplittingModel(model, max_rows=2 * data)
    lists, stats, dead = run(dofn_with(splitting, ((0, "resid_post"), (3, "mlp_out"))), batch)
    assert dead == [] and len(whole) == 1 and len(lists) == len(stats) > 1
    assert splitting.calls == [6, 6, 3, 2, 1, 3, 2, 1] if data == 1 else len(splitting.calls) > 1
    assert [n for n in splitting.calls if n <= 2 * data] == [s.computed_tokens // ROW_LENGTH for s in stats]
    hooks = ((0, "resid_post"), (3, "mlp_out"))
    got_records = sorted(r for batch in lists for r in records(batch, hooks))
    want_records = sorted(records(whole[0], hooks))
    assert len(got_records) == len(want_records) == 2 * 8
    assert [key(r) for r in got_records] == [key(r) for r in want_records]
    for index in range(2):
        got_stats = [batch.hook_stats(index) for batch in lists]
        assert sum(s["tokens"] for s in got_stats) == whole[0].hook_stats(index)["tokens"]
        assert sum(s["sum_squared_norm"] for s in got_stats) == pytest.approx(
            whole[0].hook_stats(index)["sum_squared_norm"], rel=1e-5)
    for (_, _, got), (_, _, want) in zip(got_records, want_records):
        got, want = decode_record(got), decode_record(want)
        assert got.keys() == want.keys()
        for name, value in want.items():
            if name != "activations":
                np.testing.assert_array_equal(got[name], value, err_msg=name)
        # Not bit for bit: XLA:CPU's float32 matmuls round differently for other batch shapes (about
        # 1e-6 here), so the tolerance of the other batch-composition tests (test_batching, test_mesh).
        direct = want["activations"]
        np.testing.assert_allclose(got["activations"], direct, rtol=0, atol=1e-5 * max(1, np.abs(direct).max()))


def test_an_extracted_batch_survives_a_runner_moving_it_and_its_size_is_estimated_without_encoding():
    from apache_beam.coders import registry

    from beam_extract.extract import ExtractedBatchCoder
    from beam_extract.sink.extracted import ExtractedBatch

    _, batch = eight_rows()
    [extracted], _, _ = run(dofn_with(FakeModel()), batch)
    coder = registry.get_coder(ExtractedBatch)
    assert isinstance(coder, ExtractedBatchCoder)
    moved = coder.decode(coder.encode(extracted))
    assert records(moved) == records(extracted)
    assert coder.estimate_size(extracted) >= sum(a.nbytes for a in extracted.activations)

