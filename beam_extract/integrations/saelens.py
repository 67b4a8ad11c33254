"""SAELens (`pip install 'beam-extract[saelens]'`): train from an output directory, or convert it.

- `data_provider(path, hook, batch_size)`: the endless iterator of float32 [batch_size, d_model]
  tensors that `sae_lens.SAETrainer` takes as its `data_provider`:

      config = SAETrainerConfig(total_training_samples=..., train_batch_size_samples=4096, lr=3e-4, lr_end=3e-5)
      trainer = SAETrainer(cfg=config, sae=sae, data_provider=data_provider("gs://bucket/acts", hook, 4096))
      sae = trainer.fit()

- `to_cached_activations(path, hook, out, context_size)`: SAELens's cached-activations format, an
  HF `datasets` directory with a column named by the hook, `Array2D(context_size, d_model)`, and
  `token_ids`, for `cached_activations_path` (`ActivationsStore`, `use_cached_activations=True`).

Neither imports sae_lens: the provider needs torch only, the converter HF `datasets`; both come
with the extra.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from beam_extract.integrations.pytorch import ActivationDataset
from beam_extract.integrations.shards import d_model


def scaling_factor(path: str, hook: str) -> float:
    """SAELens's activation scaling factor for `hook` under `path`: sqrt(width) / the mean L2 norm
    of its tokens (past `--norm_exclude_first`), from the manifest, so scaled tokens have a mean
    norm of sqrt(width), as SAELens's `normalize_activations="expected_average_only_in"` makes
    them. Multiply the inputs by it when training, and divide the SAE's outputs by it."""
    from beam_extract.format.layout import read_manifest

    factor = read_manifest(path)["hooks"][hook]["normalisation"]["saelens_scaling_factor"]
    if factor is None:
        raise ValueError(f"{path} has no tokens of {hook} to scale by")
    return factor


def data_provider(path: str, hook: str | None, batch_size: int, *, seed: int = 0, shuffle_buffer: int = 65536,
                  num_workers: int = 0, epochs: int | None = None, hooks: Sequence[str] | None = None,
                  stack: bool = False, scale: float | Sequence[float] = 1.0) -> Iterator[torch.Tensor]:
    """Float32 [batch_size, d_model] CPU tensors of `hook`'s tokens under `path` (local or gs://),
    shuffled as `ActivationDataset`'s, epoch after epoch (each reshuffled) until `epochs` are done,
    or without end when None: SAETrainer draws until `total_training_samples` and never signals
    the end of an epoch. Every batch is whole (SAETrainer counts samples by batch), so each shard
    leaves out fewer than `batch_size` tokens per epoch, different ones each epoch.
    `num_workers` > 0 decodes in DataLoader worker processes. With `hooks` (and hook None) each batch
    is the same tokens at several hooks, as `ActivationDataset(hooks=...)` yields them (a tuple of
    tensors, or one [batch_size, n_hooks, width] with `stack`), for trainers of transcoders and
    crosscoders. Each batch is multiplied by `scale` (one factor per hook with `hooks`), e.g.
    `scaling_factor(path, hook)`."""
    factors = [scale] * (len(hooks) if hooks else 1) if isinstance(scale, (int, float)) else list(scale)
    dataset = ActivationDataset(path, hook, batch_size, seed=seed, shuffle_buffer=shuffle_buffer, drop_last=True,
                                hooks=hooks, stack=stack)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    for epoch in itertools.count() if epochs is None else range(epochs):
        dataset.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield _scaled(batch, factors)
        if not yielded:
            # Without this an endless provider over too few tokens would spin for ever.
            raise ValueError(f"{path} has fewer than batch_size={batch_size} tokens of {hook or hooks} per shard")


def _scaled(batch, factors: list[float]):
    if all(factor == 1 for factor in factors):
        return batch
    if isinstance(batch, torch.Tensor):  # one hook [batch, width], or hooks stacked [batch, n_hooks, width]
        return batch * (factors[0] if batch.ndim == 2 else torch.tensor(factors, dtype=batch.dtype)[:, None])
    return type(batch)(part * factor for part, factor in zip(batch, factors, strict=True))


def _rows(path: str, hook: str, context_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive tokens of the records in file order, context_size at a time; a row may span two
    records, and the last tokens that do not fill a row are left out."""
    from beam_extract.readers.reader import read_activations

    acts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    held = 0
    for record in read_activations(path, hook):
        acts.append(record["activations"])
        ids.append(record["token_ids"])
        held += len(record["token_ids"])
        if held < context_size:
            continue
        all_acts, all_ids = np.concatenate(acts), np.concatenate(ids)
        whole = held - held % context_size
        for start in range(0, whole, context_size):
            yield {hook: all_acts[start: start + context_size],
                   "token_ids": all_ids[start: start + context_size].astype(np.int32)}
        acts, ids, held = [all_acts[whole:]], [all_ids[whole:]], held - whole


def to_cached_activations(path: str, hook: str, out: str, context_size: int, *, dtype: str = "float32",
                          writer_batch_size: int = 64):
    """Writes `hook`'s activations under `path` to `out` (a new local directory) in SAELens's
    cached-activations format and returns the `datasets.Dataset` loaded from it.

    Rows are `context_size` consecutive stored tokens in file and record order (a row may span two
    records; the tokens after the last whole row are left out), with their `token_ids` as int32:
    SAELens's `ActivationsStore` reads rows in order and mixes tokens in its own buffer, and uses
    `token_ids` to drop special tokens. `dtype` (float32 or float16) is the stored one.
    Writing holds `writer_batch_size` rows in memory and needs the dataset's size twice on disk
    until it is done (datasets writes a cache that `save_to_disk` copies)."""
    from datasets import Array2D, Dataset, Features, Sequence, Value, load_from_disk

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, not {dtype!r}")
    destination = Path(out)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    width = d_model(path, hook)
    features = Features({hook: Array2D(shape=(context_size, width), dtype=dtype),
                         "token_ids": Sequence(Value("int32"), length=context_size)})
    destination.parent.mkdir(parents=True, exist_ok=True)
    # A fresh cache directory: datasets would otherwise return an earlier conversion of the same
    # arguments from its cache, however the output changed since.
    cache = tempfile.mkdtemp(prefix=".beam-extract-", dir=destination.parent)
    try:
        rows = Dataset.from_generator(_rows, features=features, cache_dir=cache, writer_batch_size=writer_batch_size,
                                      gen_kwargs={"path": path, "hook": hook, "context_size": context_size})
        if not len(rows):
            raise ValueError(f"{path} has fewer than context_size={context_size} tokens of {hook}")
        rows.save_to_disk(str(destination))
    finally:
        shutil.rmtree(cache)
    return load_from_disk(str(destination))

