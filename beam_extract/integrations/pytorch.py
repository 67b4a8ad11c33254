"""A PyTorch `IterableDataset` of one hook's token activations, for SAE training.

    from torch.utils.data import DataLoader
    from beam_extract.integrations.pytorch import ActivationDataset

    dataset = ActivationDataset("gs://bucket/acts", "blocks.6.hook_resid_post", batch_tokens=4096, seed=0)
    loader = DataLoader(dataset, batch_size=None, num_workers=4)   # the dataset batches: batch_size=None
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for batch in loader:                                          # float32 [4096, d_model]
            ...

It yields whole batches of single tokens, float32 [batch_tokens, d_model], because that is what an
SAE step takes and a DataLoader collating single tokens would spend more time than the step.

With `hooks=[...]` instead of a hook it yields the same tokens at each of several hooks, shuffled
together (a transcoder's (mlp_in, mlp_out), a crosscoder's layers): a tuple of [batch_tokens, width]
tensors, or with `stack=True` one [batch_tokens, n_hooks, width] tensor; every record's sample id and
positions are checked equal across the hooks (reader.MisalignedHooks otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property

import torch
from torch.utils.data import IterableDataset, get_worker_info

from beam_extract.integrations.shards import d_model, shard_batches


def check_same_plan(digests: list[str]) -> None:
    """Each rank's plan digest, by rank: every rank must read the same files."""
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, digest in enumerate(digests):
            groups.setdefault(digest, []).append(rank)
        raise RuntimeError("ranks plan over different files (the output changed between their listings, or they "
                           "were given different paths): " + "; ".join(f"ranks {ranks} read plan {digest}"
                                                                      for digest, ranks in groups.items())
                           + ". Give every rank the same finished output, or the same snapshot (write_snapshot)")


class ActivationDataset(IterableDataset):
    """Token activations of `hook` under the output directory `path` (local or gs://; a finished run
    through its manifest, a run still going through the files committed when the dataset is made),
    or of the files a snapshot at `path` lists.

    Each DataLoader worker of each DDP rank is a shard that reads its own files (or, with fewer files
    than shards, its own records of a shared file): per epoch every token is yielded once over all
    shards, provided every rank plans over the same files: a finished run's (its manifest), or a
    snapshot's (`beam_extract.readers.reader.write_snapshot`, its path passed as `path` to every rank).
    A run still going is refused when `world_size` > 1; under torch.distributed the ranks compare
    their plans' digests (`plan_digest`) and all fail if they differ. `rank` and `world_size` default
    to torch.distributed's when it is initialised. Shards end
    up with token counts that differ by up to a file's, so under DDP train for a fixed number of
    steps rather than to the end of an epoch.

    Shuffled (the default), files are visited in an order drawn from (seed, epoch) and each shard
    mixes its tokens through a buffer of `shuffle_buffer + batch_tokens` tokens, held per worker in
    the output's dtype ((shuffle_buffer + batch_tokens) * d_model * 2 bytes each for bfloat16); a seed and epoch give the same batches again for the
    same number of workers and ranks. Call `set_epoch` before each epoch; with
    `persistent_workers=True` the workers keep the epoch they started with, as they keep their copy
    of the dataset. The last batch of each shard is short unless `drop_last`."""

    def __init__(self, path: str, hook: str | None = None, batch_tokens: int = 4096, *, shuffle: bool = True,
                 shuffle_buffer: int = 65536, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None, hooks: Sequence[str] | None = None,
                 stack: bool = False) -> None:
        from beam_extract.readers.reader import hook_widths, paired_files, per_hook, read_plan

        if batch_tokens < 1 or shuffle_buffer < 0:
            raise ValueError(f"batch_tokens must be >= 1 and shuffle_buffer >= 0 (got {batch_tokens}, {shuffle_buffer})")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else torch.distributed.get_rank() if distributed else 0
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        if (hook is None) == (hooks is None):
            raise ValueError("give either hook or hooks")
        # Listed once here, not in each worker: a gs:// listing per worker per epoch is slow and could
        # disagree between workers on a run still being written. Ranks list it each for itself, so
        # they must plan over files that do not change: a finished run's, or a snapshot's.
        plan = read_plan(path)
        wanted = [hook] if hooks is None else list(hooks)
        self.path, self.hook, self.hooks, self.stack, self.widths = path, hook, hooks, stack, None
        self.files = plan.files(hook) if hooks is None else paired_files(plan, wanted)
        self.plan_digest = plan.digest(wanted)
        if distributed and rank is None and world_size is None and self.world_size > 1:
            digests: list = [None] * self.world_size
            torch.distributed.all_gather_object(digests, self.plan_digest)
            check_same_plan(digests)
        if self.world_size > 1 and not plan.fixed:
            raise ValueError(f"{path} is a run still going (no manifest): ranks listing its files at different "
                             "times would read some tokens twice and others never. List them once with "
                             f"beam_extract.readers.reader.write_snapshot({path!r}, SNAPSHOT) and give every rank "
                             "SNAPSHOT as its path")
        plan.warn()
        if hooks is not None:
            self.widths = hook_widths(self.files[0]) if self.files else [0] * len(hooks)
            per_hook([], self.widths, stack)  # refuses stacking hooks of other widths here, not in a worker
        self.batch_tokens, self.shuffle, self.shuffle_buffer = batch_tokens, shuffle, shuffle_buffer
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    @cached_property
    def d_model(self) -> int:
        """The activation width (read from the first record); a paired dataset has `widths`, one per hook."""
        if self.hooks is not None:
            raise AttributeError(f"a dataset of several hooks has widths {self.widths}, not one d_model")
        return d_model(self.path, self.hook)

    def set_epoch(self, epoch: int) -> None:
        """Draws the file order and the mixing of epoch `epoch` in the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = shard_batches(self.files, self.rank * workers + worker, self.world_size * workers,
                                batch_tokens=self.batch_tokens, shuffle=self.shuffle,
                                shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch,
                                drop_last=self.drop_last)
        if self.hooks is None:
            yield from map(torch.from_numpy, batches)
            return
        from beam_extract.readers.reader import per_hook

        for batch in per_hook(batches, self.widths, self.stack):
            yield torch.from_numpy(batch) if self.stack else tuple(map(torch.from_numpy, batch))
