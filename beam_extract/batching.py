"""Samples -> fixed-shape batches, so the jitted forward compiles once per batch shape.

Two ways to fill a row: a sample alone in a row of its length bucket, or several samples packed
into one row of `pack_length` tokens. A packed row gives each sample its own segment id and
restarts positions at 0, so attention never crosses samples and each sample's activations equal
those of an unpacked run. Padding is compute we pay for, never data we store.

Shapes are few: row lengths come from the bucket set, and a batch has the plan's rows, except the
last, partial batch of a shape that never filled a batch (a small job, a rare length, a streaming
trickle): it gets the smallest shape that holds it, a power of two of rows and, for packed rows,
the smallest bucket that holds its fullest row. That adds at most ceil(log2(rows)) row counts per
length (3 for 8 rows), and no compilation to the shape's own: its full shape never ran. A shape
that filled a batch keeps that shape for its last one, which is compiled already. (A partial batch
flushed after a streaming timeout is its key's own, by the same rule.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam import coders
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from beam_extract.tokenize import Sample

# A packing key buffers this many batches' worth of tokens before it packs: enough choice for
# first-fit to fill rows; only the least-filled rows wait for more samples.
PACK_LOOKAHEAD_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class Placement:
    sample: Sample
    row: int
    start: int  # offset of the sample's first token in its row


@dataclasses.dataclass(frozen=True)
class Batch:
    placements: tuple[Placement, ...]
    tokens: np.ndarray  # int32 [rows, length]
    positions: np.ndarray  # int32 [rows, length]: restart at 0 for every sample
    segment_ids: np.ndarray  # int32 [rows, length]: 1, 2, ... per sample in a row; 0 for padding

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def used_rows(self) -> int:
        """Rows up to the last one holding a sample; the rest are padding."""
        return max(p.row for p in self.placements) + 1

    def pad_rows(self, multiple: int) -> Batch:
        """This batch with empty rows added, so it splits evenly over the mesh's data shards."""
        missing = -self.tokens.shape[0] % multiple
        if not missing:
            return self
        grow = lambda a: np.pad(a, ((0, missing), (0, 0)))  # noqa: E731
        return dataclasses.replace(self, tokens=grow(self.tokens), positions=grow(self.positions),
                                   segment_ids=grow(self.segment_ids))

    def row_range(self, first: int, stop: int, multiple: int) -> Batch:
        """Rows [first, stop) as a batch of their own, with their placements re-indexed, padded to a
        multiple of `multiple` rows."""
        placements = tuple(dataclasses.replace(p, row=p.row - first) for p in self.placements
                           if first <= p.row < stop)
        return Batch(placements, self.tokens[first:stop], self.positions[first:stop],
                     self.segment_ids[first:stop]).pad_rows(multiple)

    def halves(self, multiple: int) -> list[Batch]:
        """The used rows in two halves (one batch when only one row is used), each padded to a
        multiple of `multiple` rows."""
        used = self.used_rows
        if used == 1:
            return [self.row_range(0, 1, multiple)]
        half = (used + 1) // 2
        return [self.row_range(0, half, multiple), self.row_range(half, used, multiple)]


BUCKET_GRAIN = 32  # geometric buckets are rounded up to multiples of this many tokens


def geometric_buckets(ratio: float, max_seq_len: int) -> set[int]:
    """Each power of two from 32 and its multiples by ratio, ratio^2, ... below the next power of
    two, rounded up to a multiple of 32: a row is padded by at most about a factor `ratio`, and the
    number of lengths grows with log(max_seq_len), not with max_seq_len."""
    buckets, octave = set(), BUCKET_GRAIN
    while octave < max_seq_len:
        step = 0
        while octave * ratio**step < 2 * octave * (1 - 1e-9):
            buckets.add(math.ceil(octave * ratio**step / BUCKET_GRAIN - 1e-9) * BUCKET_GRAIN)
            step += 1
        octave *= 2
    return {b for b in buckets if b < max_seq_len}


def parse_buckets(spec: str, max_seq_len: int) -> tuple[int, ...]:
    """`geometric:R` (powers of two from 32 and R, R^2, ... times each, rounded up to multiples of
    32; 1.01 <= R <= 2), `multiples:N` (N, 2N, ...), `pow2` (powers of two from 16), or a list like
    `256,1024,4096`. max_seq_len is always the largest bucket."""
    try:
        if spec.startswith("geometric:"):
            ratio = float(spec.partition(":")[2])
            if not 1.01 <= ratio <= 2:
                raise ValueError(f"--buckets {spec!r}: the ratio must be from 1.01 to 2")
            buckets = geometric_buckets(ratio, max_seq_len)
        elif spec.startswith("multiples:"):
            step = int(spec.partition(":")[2])
            buckets = set(range(step, max_seq_len, step))
        elif spec == "pow2":
            buckets = {2**i for i in range(4, max_seq_len.bit_length()) if 2**i < max_seq_len}
        else:
            buckets = {int(b) for b in spec.split(",") if int(b) < max_seq_len}
    except ValueError as error:
        if str(error).startswith("--buckets"):
            raise
        raise ValueError(f"--buckets {spec!r}: use geometric:R, multiples:N, pow2, or a list of lengths") from None
    if any(b < 1 for b in buckets):
        raise ValueError(f"--buckets {spec!r}: lengths must be positive")
    return tuple(sorted(buckets | {max_seq_len}))


def bucket_length(n_tokens: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n_tokens."""
    for bucket in buckets:
        if n_tokens <= bucket:
            return bucket
    raise ValueError(f"{n_tokens} tokens exceed the largest bucket {buckets[-1]}")


def pack_rows(samples: Sequence[Sample], row_length: int) -> list[list[Sample]]:
    """First-fit decreasing: longest samples first, each into the first row with room."""
    rows: list[list[Sample]] = []
    free: list[int] = []
    for sample in sorted(samples, key=lambda s: (-len(s.token_ids), s.sample_id)):
        n = len(sample.token_ids)
        if n > row_length:
            raise ValueError(f"sample {sample.sample_id} has {n} tokens, rows have {row_length}")
        for i, room in enumerate(free):
            if n <= room:
                rows[i].append(sample)
                free[i] -= n
                break
        else:
            rows.append([sample])
            free.append(row_length - n)
    return rows


def assemble(rows: Sequence[Sequence[Sample]], n_rows: int, row_length: int) -> Batch:
    """A [n_rows, row_length] batch; rows past len(rows) are empty (all padding)."""
    if not 0 < len(rows) <= n_rows:
        raise ValueError(f"{len(rows)} rows for a batch of {n_rows}")
    tokens = np.zeros((n_rows, row_length), np.int32)
    positions = np.zeros((n_rows, row_length), np.int32)
    segment_ids = np.zeros((n_rows, row_length), np.int32)
    placements = []
    for row, samples in enumerate(rows):
        start = 0
        for segment, sample in enumerate(samples, start=1):
            n = len(sample.token_ids)
            if start + n > row_length:
                raise ValueError(f"row {row} overflows {row_length} tokens")
            tokens[row, start : start + n] = sample.token_ids
            positions[row, start : start + n] = np.arange(n)
            segment_ids[row, start : start + n] = segment
            placements.append(Placement(sample, row, start))
            start += n
    return Batch(tuple(placements), tokens, positions, segment_ids)


def row_counts(rows: int) -> tuple[int, ...]:
    """The row counts a batch of a length whose batches have `rows` rows may have: `rows`, and for
    a last partial batch the powers of two below it."""
    return tuple(sorted({1 << i for i in range(rows.bit_length()) if 1 << i < rows} | {rows}))


def row_fill(row: Sequence[Sample]) -> int:
    return sum(len(s.token_ids) for s in row)


TailShape = Callable[[Sequence[Sequence[Sample]], bool], "tuple[int, int] | None"]
SHRINK_POLICIES = ("unfilled", "always", "never")


def form_batches(samples: Sequence[Sample], row_length: int, rows_per_batch: int, pack: bool,
                 final: bool, tail_shape: TailShape | None = None) -> tuple[list[Batch], list[Sample]]:
    """Full batches from the fullest rows, and the samples left for later. `final` also emits the
    rest: a last batch of the least-filled rows, of shape `tail_shape(rows, full batches emitted
    with it?)` (rows, length) where that gives one, else padded with empty rows to a full batch."""
    rows = pack_rows(samples, row_length) if pack else [[s] for s in sorted(samples, key=lambda s: s.sample_id)]
    rows.sort(key=lambda row: -row_fill(row))  # stable: ties keep their order
    n_full = len(rows) // rows_per_batch * rows_per_batch
    batches = [assemble(rows[i : i + rows_per_batch], rows_per_batch, row_length)
               for i in range(0, n_full, rows_per_batch)]
    if not final:
        return batches, [s for row in rows[n_full:] for s in row]
    if n_full < len(rows):
        tail = rows[n_full:]
        shape = tail_shape(tail, bool(batches)) if tail_shape else None
        batches.append(assemble(tail, *(shape or (rows_per_batch, row_length))))
    return batches, []


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which row each sample goes to, and how many rows a batch of each row length has."""

    buckets: tuple[int, ...]
    batch_size: int  # rows per batch, unless tokens_per_batch is set
    tokens_per_batch: int  # 0: use batch_size
    packing: str  # one of options.PACKING_MODES
    pack_length: int
    flush_seconds: int = 0  # streaming: emit a partial batch this long after its first sample; 0: never

    def key(self, sample: Sample) -> tuple[int, bool]:
        """(row length, packed?) for a sample."""
        n = len(sample.token_ids)
        packs = self.packing == "all" or (self.packing == "text" and not sample.task_id)
        if packs and n <= self.pack_length:
            return self.pack_length, True
        return bucket_length(n, self.buckets), False

    def rows(self, row_length: int) -> int:
        return max(1, self.tokens_per_batch // row_length) if self.tokens_per_batch else self.batch_size

    def weight(self, sample: Sample, packed: bool) -> int:
        """What a key's buffer counts: tokens if packed, else samples."""
        return len(sample.token_ids) if packed else 1

    def ready(self, weight: int, row_length: int, packed: bool) -> bool:
        """Whether a key's buffer holds enough to emit full batches."""
        rows = self.rows(row_length)
        return weight >= (PACK_LOOKAHEAD_BATCHES * rows * row_length if packed else rows)

    def tail_shape(self, rows: Sequence[Sequence[Sample]], row_length: int) -> tuple[int, int]:
        """The smallest shape for a last, partial batch of these rows: the shortest bucket (at most
        `row_length`) that holds the fullest row, and the fewest of that length's row counts."""
        length = min(row_length, bucket_length(max(map(row_fill, rows)), sorted({*self.buckets, row_length})))
        return next(n for n in row_counts(self.rows(length)) if n >= len(rows)), length

    def form(self, samples: Sequence[Sample], row_length: int, packed: bool, final: bool, filled: bool,
             shrink: str = "unfilled") -> tuple[list[Batch], list[Sample]]:
        """form_batches with this plan's rows. `filled`: the key has emitted a full batch before.
        The last batch takes its smallest shape by the `shrink` policy: `unfilled` (BatchDoFn's)
        when the key emits no full batch, before or with it (its full shape is then not compiled
        for it, and the small shape costs no extra compilation), `always`, or `never`."""
        def tail(rows, with_full_batches):
            if shrink == "always" or (shrink == "unfilled" and not filled and not with_full_batches):
                return self.tail_shape(rows, row_length)
            return None

        return form_batches(samples, row_length, self.rows(row_length), packed, final, tail)

    def batch_all(self, samples: Sequence[Sample], shrink: str = "unfilled") -> list[Batch]:
        """What BatchDoFn makes of these samples, in this order, in one window on one shard, each
        key flushing its own rest (as on a runner without gathered tails), computed in memory (for
        the padding benchmark and tests); `shrink` as in `form`."""
        batches, buffers = self._buffered(samples, shrink)
        return batches + [batch for buffer in buffers for batch in buffer.take(final=True)]

    def batch_keys(self, keys: Sequence[Sequence[Sample]]) -> list[Batch]:
        """What BatchKeyedSamples makes of each shard's samples, in this order, in one window: every
        key's full batches, then each shape's rests gathered (tail_batches), computed in memory."""
        batches, rests = [], {}
        for samples in keys:
            full, buffers = self._buffered(samples)
            batches += full
            for buffer in buffers:
                batches += buffer.take(final=False)
                rests.setdefault((buffer.row_length, buffer.packed), []).append((buffer.samples, buffer.filled))
        return batches + [batch for shape_rests in rests.items() for batch in tail_batches(shape_rests, self)]

    def _buffered(self, samples: Sequence[Sample], shrink: str = "unfilled") -> tuple[list[Batch], list[KeyBuffer]]:
        """The full batches these samples fill on one shard, and each key's buffer after them."""
        buffers: dict[tuple[int, bool], KeyBuffer] = {}
        batches = []
        for sample in samples:
            key = self.key(sample)
            batches += buffers.setdefault(key, KeyBuffer(self, *key, shrink=shrink)).add(sample)
        return batches, list(buffers.values())


@dataclasses.dataclass
class KeyBuffer:
    """One batching key's samples not yet in a batch, and whether it emitted a full one: what
    BatchDoFn keeps in state, and batch_all in memory."""

    plan: BatchPlan
    row_length: int
    packed: bool
    samples: list[Sample] = dataclasses.field(default_factory=list)
    weight: int = 0  # of the samples, by plan.weight
    filled: bool = False  # a batch of the key's full shape was emitted
    shrink: str = "unfilled"

    def count(self, sample: Sample) -> bool:
        """Adds a sample's weight (its caller keeps the sample with `samples`): whether the buffer
        now holds enough for full batches (`take(final=False)`)."""
        self.weight += self.plan.weight(sample, self.packed)
        return self.plan.ready(self.weight, self.row_length, self.packed)

    def add(self, sample: Sample) -> list[Batch]:
        """Buffers a sample: the full batches it completes, if any."""
        self.samples.append(sample)
        return self.take(final=False) if self.count(sample) else []

    def take(self, final: bool) -> list[Batch]:
        """The full batches the buffer holds, and with `final` the rest; what is left stays."""
        batches, self.samples = self.plan.form(self.samples, self.row_length, self.packed, final, self.filled,
                                               self.shrink)
        self.weight = sum(self.plan.weight(s, self.packed) for s in self.samples)
        full_shape = (self.plan.rows(self.row_length), self.row_length)
        self.filled = self.filled or any(batch.tokens.shape == full_shape for batch in batches)
        return batches


def tail_batches(shape_rests: tuple[tuple[int, bool], Iterable[tuple[Sequence[Sample], bool]]],
                 plan: BatchPlan) -> list[Batch]:
    """The batches of one shape's end-of-window rests from every key: full ones, and at most one
    partial batch, which keeps the full shape if a key's full batch of it ran (already compiled)."""
    (row_length, packed), rests = shape_rests
    rests = list(rests)
    buffer = KeyBuffer(plan, row_length, packed, [sample for rest, _ in rests for sample in rest],
                       filled=any(filled for _, filled in rests))
    return buffer.take(final=True)


# Batching keys carry a shard per worker process and thread (as Beam's GroupIntoBatches.WithShardedKey
# does), so a popular row length is batched in parallel instead of on one worker.
_PROCESS_SHARD = uuid.uuid4().hex


def shard_key(sample: Sample, plan: BatchPlan) -> tuple[tuple[int, bool, str], Sample]:
    return (*plan.key(sample), f"{_PROCESS_SHARD}-{threading.get_ident()}"), sample


REST = "rest"  # BatchDoFn's output of each key's samples left at the end of a window, with its `filled` flag


class BatchDoFn(beam.DoFn):
    """Buffers a key's samples in state; emits full batches as they fill, and the rest when the
    window's input is complete (end of a batch job or of a streaming window) or, in streaming, when
    the buffer's first sample has waited `plan.flush_seconds`. With `gather_tails`, the window's
    end emits the full batches and sends the rest to the REST output, keyed by shape, for
    tail_batches to batch with the other keys' rests."""

    BUFFER = BagStateSpec("buffer", coders.PickleCoder())
    WEIGHT = ReadModifyWriteStateSpec("weight", coders.VarIntCoder())  # buffered tokens if packed, else samples
    FILLED = ReadModifyWriteStateSpec("filled", coders.BooleanCoder())  # a full batch was emitted
    END_OF_WINDOW = TimerSpec("end_of_window", TimeDomain.WATERMARK)
    # Processing time, set from the wall clock as Beam's GroupIntoBatches does. Batch jobs leave it
    # unset: their one window ends when the input does (and the FnApiRunner fired such a timer
    # seconds early when its input ran out).
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)

    def __init__(self, plan: BatchPlan, gather_tails: bool = False):
        self._plan = plan
        self._gather_tails = gather_tails  # end of window: full batches here, the rest to the REST output
        self._flushed = Metrics.counter("batching", "partial_batches_flushed_after_timeout")

    def process(self, element, window=beam.DoFn.WindowParam, buffer=beam.DoFn.StateParam(BUFFER),
                weight=beam.DoFn.StateParam(WEIGHT), filled=beam.DoFn.StateParam(FILLED),
                end_of_window=beam.DoFn.TimerParam(END_OF_WINDOW), flush=beam.DoFn.TimerParam(FLUSH)):
        (row_length, packed, _), sample = element
        end_of_window.set(window.max_timestamp())
        if self._plan.flush_seconds and not weight.read():
            flush.set(Timestamp.now() + self._plan.flush_seconds)
        buffer.add(sample)
        # The buffered samples are read only when they make a batch, not for every sample.
        state = KeyBuffer(self._plan, row_length, packed, weight=weight.read() or 0, filled=bool(filled.read()))
        if state.count(sample):
            state.samples = list(buffer.read())
            yield from self._take(state, buffer, weight, filled, final=False)
        else:
            weight.write(state.weight)

    @on_timer(END_OF_WINDOW)
    def flush_at_end_of_window(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER),
                               weight=beam.DoFn.StateParam(WEIGHT), filled=beam.DoFn.StateParam(FILLED)):
        state = self._load(key, buffer, weight, filled)
        if not self._gather_tails:
            yield from self._take(state, buffer, weight, filled, final=True)
            return
        yield from state.take(final=False)
        buffer.clear()  # the window is over: its state goes too
        weight.clear()
        if state.samples or state.filled:  # an empty rest still says that the shape filled a batch
            yield beam.pvalue.TaggedOutput(REST, ((state.row_length, state.packed), (state.samples, state.filled)))

    @on_timer(FLUSH)
    def flush_after_timeout(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER),
                            weight=beam.DoFn.StateParam(WEIGHT), filled=beam.DoFn.StateParam(FILLED)):
        for batch in self._take(self._load(key, buffer, weight, filled), buffer, weight, filled, final=True):
            self._flushed.inc()
            yield batch

    def _load(self, key, buffer, weight, filled) -> KeyBuffer:
        row_length, packed, _ = key
        return KeyBuffer(self._plan, row_length, packed, list(buffer.read()), weight.read() or 0,
                         bool(filled.read()))

    @staticmethod
    def _take(state: KeyBuffer, buffer, weight, filled, final: bool) -> list[Batch]:
        """state.take, with what is left written back to the key's state."""
        batches = state.take(final)
        buffer.clear()
        for sample in state.samples:
            buffer.add(sample)
        weight.write(state.weight)
        filled.write(state.filled)
        return batches


def seeded_key(sample: Sample, seed: int) -> tuple[bytes, Sample]:
    return hashlib.sha256(f"{seed}\x00{sample.sample_id}".encode()).digest()[:8], sample


class ShuffleSamples(beam.PTransform):
    """Redistributes samples by a seeded hash of their id, so batches (and the files written from
    them) mix documents from all over the input instead of following input order."""

    def __init__(self, seed: int):
        super().__init__()
        self._seed = seed

    def expand(self, samples):
        return (
            samples
            | "SeededKey" >> beam.Map(seeded_key, self._seed)
            | "Group" >> beam.GroupByKey()
            | "Ungroup" >> beam.FlatMap(lambda keyed: keyed[1])
        )


def holds_watermark_for_timers(options: PipelineOptions) -> bool:
    """Whether the runner holds a stateful DoFn's output watermark until its event-time timers have
    fired. Beam 2.77's BundleBasedDirectRunner does not: a GroupByKey after BatchDoFn completes
    before the end-of-window rests reach it (it fails the job), so there each key flushes its own."""
    return options.view_as(StandardOptions).runner != "BundleBasedDirectRunner"


class BatchKeyedSamples(beam.PTransform):
    """(row length, packed, shard) -> Sample pairs -> Batches: each key's full batches, and the rests
    the keys hold when a window ends gathered into one key per shape, so a shape has at most one
    partial batch per window however many keys it had (BatchSamples keys by producing thread: 768
    partial batches per shape on 64 workers x 12 threads). One tail key per shape is enough: a
    key's rest is less than a batch, and the full batches formed from the rests are reshuffled over
    the workers before the forward."""

    def __init__(self, plan: BatchPlan):
        super().__init__()
        self._plan = plan

    def expand(self, keyed):
        plan = self._plan
        if not holds_watermark_for_timers(keyed.pipeline.options):
            return keyed | "Batch" >> beam.ParDo(BatchDoFn(plan))
        batched = keyed | "Batch" >> beam.ParDo(BatchDoFn(plan, gather_tails=True)).with_outputs(REST, main="full")
        tails = (
            batched[REST]
            | "GatherTails" >> beam.GroupByKey()
            | "BatchTails" >> beam.FlatMap(tail_batches, plan)
            | "SpreadTails" >> beam.Reshuffle()
        )
        return (batched.full, tails) | "AllBatches" >> beam.Flatten()


class BatchSamples(beam.PTransform):
    """Samples -> Batches of static shapes: [rows(row_length), row_length], and for the last batch
    of a shape that never filled one, the smaller BatchPlan.tail_shape. Keyed by producing process
    and thread (shard_key), then BatchKeyedSamples.

    Not Beam's BatchElements: it varies batch sizes on purpose, and every new shape recompiles.
    """

    def __init__(self, plan: BatchPlan):
        super().__init__()
        self._plan = plan

    def expand(self, samples):
        return (
            samples
            | "Key" >> beam.Map(shard_key, self._plan).with_output_types(tuple[tuple[int, bool, str], Sample])
            | "Batch" >> BatchKeyedSamples(self._plan)
        )
