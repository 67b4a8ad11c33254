"""A seeded mixing buffer, as tf.data's shuffle: arrays of rows in, float32 batches of single rows out.

Used by `reader.token_batches` and the PyTorch and SAELens consumers. The buffer holds rows in their
stored dtype (a 1M-token buffer of d_model 896 in bfloat16 is 1.7 GiB) and fills in reading order;
once `buffer_tokens + batch_tokens` rows are held, each batch is drawn uniformly from them and the
rows read next take its places. Each row is copied into the buffer once and out once, in its batch,
so a batch costs O(batch_tokens) whatever the buffer's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def mixed_batches(arrays: Iterable[np.ndarray], batch_tokens: int, buffer_tokens: int, rng: np.random.Generator,
                  drop_last: bool = True) -> Iterator[np.ndarray]:
    """Float32 [batch_tokens, d_model] batches of the rows of `arrays` (each [n, d_model], of one
    dtype), every row once. At the end the rows still held leave in a random order; the last,
    short batch is dropped if `drop_last`."""
    capacity = buffer_tokens + batch_tokens
    pool, drawn, held = None, None, 0  # rows [0, held) of the pool hold tokens until it is full
    vacant = np.empty(0, np.int64)  # once full: the places the last batch left, taken by the next rows

    def draw(places: np.ndarray) -> np.ndarray:
        out = drawn[:len(places)]
        np.take(pool, places, axis=0, out=out, mode="clip")  # "raise" would copy through a buffer
        return out.astype(np.float32)

    for rows in arrays:
        if pool is None:
            pool = np.empty((capacity, rows.shape[1]), rows.dtype)
            drawn = np.empty((batch_tokens, rows.shape[1]), rows.dtype)
        placed = min(len(rows), capacity - held)
        pool[held:held + placed] = rows[:placed]
        held, rows = held + placed, rows[placed:]
        while len(rows):
            if not len(vacant):
                vacant = rng.choice(capacity, batch_tokens, replace=False, shuffle=False)
                yield draw(vacant)
            placed = min(len(rows), len(vacant))
            pool[vacant[:placed]] = rows[:placed]
            vacant, rows = vacant[placed:], rows[placed:]
    if pool is None:
        return
    rest = np.setdiff1d(np.arange(held), vacant, assume_unique=True)
    rng.shuffle(rest)
    end = len(rest) - len(rest) % batch_tokens if drop_last else len(rest)
    for start in range(0, end, batch_tokens):
        yield draw(rest[start: start + batch_tokens])
