"""Samples -> fixed-shape batches, so the jitted forward compiles once per length bucket."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import apache_beam as beam
import numpy as np

from beam_extract.tokenize import Sample

BUCKET_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class Batch:
    samples: tuple[Sample, ...]  # real rows, in order; rows past len(samples) are padding
    tokens: np.ndarray  # int32 [batch_size, length]
    positions: np.ndarray  # int32 [batch_size, length]
    segment_ids: np.ndarray  # int32 [batch_size, length]: 1 for real tokens, 0 for padding


def bucket_length(n_tokens: int, max_seq_len: int, multiple: int = BUCKET_MULTIPLE) -> int:
    """The padded length for a sample: the next multiple of `multiple`, capped at max_seq_len."""
    return min(max_seq_len, -(-n_tokens // multiple) * multiple)


def make_batch(samples: Sequence[Sample], batch_size: int, length: int) -> Batch:
    """Right-pads each sample to `length` and the batch to `batch_size` rows (static shapes)."""
    if not 0 < len(samples) <= batch_size:
        raise ValueError(f"{len(samples)} samples for a batch of {batch_size}")
    tokens = np.zeros((batch_size, length), np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        if n > length:
            raise ValueError(f"sample {sample.sample_id} has {n} tokens, bucket is {length}")
        tokens[row, :n] = sample.token_ids
        segment_ids[row, :n] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
    return Batch(tuple(samples), tokens, positions, segment_ids)


class BatchByBucket(beam.PTransform):
    """Groups samples of the same length bucket into batches of exactly `batch_size` rows.

    Not Beam's BatchElements: it varies batch sizes on purpose, and every new shape recompiles.
    """

    def __init__(self, batch_size: int, max_seq_len: int):
        super().__init__()
        self._batch_size = batch_size
        self._max_seq_len = max_seq_len

    def expand(self, samples):
        batch_size, max_seq_len = self._batch_size, self._max_seq_len
        return (
            samples
            | "KeyByBucket" >> beam.Map(lambda s: (bucket_length(len(s.token_ids), max_seq_len), s)).with_output_types(
                tuple[int, Sample])
            | "Group" >> beam.GroupIntoBatches.WithShardedKey(batch_size)
            | "Pad" >> beam.MapTuple(lambda key, group: make_batch(list(group), batch_size, key.key))
        )
