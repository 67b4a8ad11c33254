"""The numpy core of the consumers: which records a shard (a DataLoader worker of a DDP rank) reads,
and its batches of single tokens, in order or through the reader's mixing buffer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from beam_extract.readers.mixing import mixed_batches


def d_model(path: str, hook: str) -> int:
    """The activation width of `hook` under `path`, from its first record (a run still going has no
    manifest to say it)."""
    from beam_extract.readers.reader import read_activations

    for record in read_activations(path, hook):
        return record["d_model"]
    raise ValueError(f"{path} has no records of {hook}")


def shard_plan(n_files: int, shard: int, n_shards: int) -> list[tuple[int, int, int]]:
    """(file index, first record, record stride) for each file that `shard` of `n_shards` reads; over
    all shards, every record of every file is read exactly once.

    Whole files go to shards round-robin while there are at least as many files as shards; with fewer
    files (a small output read by many workers) each file's records are strided over the shards that
    share it, so no shard sits idle. Those shards each read the whole file but decode only their own
    records."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    if n_files >= n_shards:
        return [(f, 0, 1) for f in range(shard, n_files, n_shards)]
    if not n_files:
        return []
    f = shard % n_files
    return [(f, shard // n_files, len(range(f, n_shards, n_files)))]


def shard_tokens(files: list[str] | list[tuple[str, ...]], shard: int, n_shards: int) -> Iterator[np.ndarray]:
    """The activations [n_tokens, d_model] (as stored) of each record `shard` reads, in file order.
    Where `files` are tuples (a commit's file of each of several hooks, `reader.paired_files`), each
    record's tokens at every hook side by side, [n_tokens, sum of widths], their alignment checked."""
    # Imported on use: the reader's modules are the ones that reach gs://, and this package stays
    # importable without them being loaded.
    from beam_extract.readers.reader import aligned_records, joined_tokens

    def records() -> Iterator[tuple[bytes, ...]]:
        for index, first, stride in shard_plan(len(files), shard, n_shards):
            paired = files[index] if isinstance(files[index], tuple) else (files[index],)
            for i, data in enumerate(aligned_records(paired)):
                if i % stride == first:
                    yield data

    return joined_tokens(records())


def batches_in_order(arrays: Iterable[np.ndarray], batch_tokens: int, drop_last: bool = False) -> Iterator[np.ndarray]:
    """The rows of `arrays` (of one dtype) in order, as float32 [batch_tokens, d_model] batches (the
    last one short unless `drop_last`)."""
    held: list[np.ndarray] = []
    count = 0
    for rows in arrays:
        held.append(rows)
        count += len(rows)
        if count >= batch_tokens:
            joined = np.concatenate(held).astype(np.float32, copy=False)
            whole = count - count % batch_tokens
            yield from (joined[start: start + batch_tokens] for start in range(0, whole, batch_tokens))
            held, count = [joined[whole:]], count - whole
    if count and not drop_last:
        yield np.concatenate(held).astype(np.float32, copy=False)


def shard_batches(files: list[str] | list[tuple[str, ...]], shard: int, n_shards: int, *, batch_tokens: int,
                  shuffle: bool, shuffle_buffer: int, seed: int, epoch: int, drop_last: bool) -> Iterator[np.ndarray]:
    """One epoch of `shard`'s token batches. Shuffled, the files are visited in an order drawn from
    (seed, epoch), the same in every shard (so the shards' files stay disjoint), and each shard mixes
    its tokens with its own generator (seed, epoch, shard)."""
    if not shuffle:
        return batches_in_order(shard_tokens(files, shard, n_shards), batch_tokens, drop_last)
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    tokens = shard_tokens([files[i] for i in order], shard, n_shards)
    return mixed_batches(tokens, batch_tokens, shuffle_buffer, np.random.default_rng([seed, epoch, shard]), drop_last)
