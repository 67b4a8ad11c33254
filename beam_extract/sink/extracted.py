"""What one forward batch hands to the writer, and its records encoded per (batch, hook).

The activations stay as the device returned them ([rows, S, width] per hook, in the output dtype); a
record takes a view of its sample's stored tokens, so encoding copies each activation byte once.
What a sample's records share (token ids, positions, ids) is encoded once for all hooks; a hook's
width (which differs between sites) with the hook's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from beam_extract.format.schema import SampleFields, activation_bytes, hook_fields, record_parts, sample_fields
from beam_extract.tokenize import Sample


# What a shard group sums per hook (besides its records) from each batch's `hook_stats`.
HOOK_STATS = ("tokens", "sum_l2_norm", "sum_squared_norm", "norm_tokens", "norm_sum_l2_norm", "norm_sum_squared_norm")


@dataclasses.dataclass(frozen=True)
class StoredSample:
    sample: Sample
    row: int
    columns: slice | np.ndarray  # the row's columns holding the sample's stored tokens, in order
    digest: str  # tokenize.sample_digest, recorded with its commit


@dataclasses.dataclass(frozen=True, eq=False)
class ExtractedBatch:
    """The samples of a batch whose activations are finite at every hook, and per hook (in the job's
    hook order) the batch's activations [rows, S, d] in `output_dtype` and each token's L2 norm
    [rows, S] (float32, computed on the device from the stored values). Build it with
    `extracted_batch`."""

    samples: tuple[StoredSample, ...]
    fields: tuple[SampleFields, ...]  # each sample's encoded features, shared by its records
    activations: tuple[np.ndarray, ...]
    norms: tuple[np.ndarray, ...]
    positions: np.ndarray  # [rows, S]: each token's position in its own sequence
    output_dtype: str

    def in_order(self, order: np.ndarray) -> ExtractedBatch:
        """The same batch with its samples (and so its records in every file) in another order."""
        return dataclasses.replace(self, samples=tuple(self.samples[i] for i in order),
                                   fields=tuple(self.fields[i] for i in order))

    def records(self, hook: int, name: str, layer: int) -> Iterator[bytes]:
        """The serialized tf.train.Example of each sample at the hook'th hook, in sample order."""
        values = self.activations[hook]
        tail = hook_fields(name, layer, values.shape[-1])
        for stored, fields in zip(self.samples, self.fields):
            data = activation_bytes(values[stored.row, stored.columns], self.output_dtype)
            yield b"".join(record_parts(data, fields, tail))

    def hook_stats(self, hook: int, norm_exclude_first: int = 0) -> dict:
        """At the hook'th hook, the stored tokens and the sums of their L2 and squared L2 norms; and
        the same (`norm_*`) of those at positions from `norm_exclude_first` on, for the
        normalisation factors (a sequence's first tokens are attention sinks with outlying norms)."""
        if not self.samples:
            return dict.fromkeys(HOOK_STATS, 0)
        # float64: a float32 norm's square is exact there, and huge 16-bit values do not overflow.
        norms = np.concatenate([self.norms[hook][s.row, s.columns] for s in self.samples]).astype(np.float64)
        squared = np.square(norms)
        counted = np.concatenate([self.positions[s.row, s.columns] for s in self.samples]) >= norm_exclude_first
        return {"tokens": len(squared), "sum_l2_norm": float(norms.sum()), "sum_squared_norm": float(squared.sum()),
                "norm_tokens": int(counted.sum()), "norm_sum_l2_norm": float(norms[counted].sum()),
                "norm_sum_squared_norm": float(squared[counted].sum())}


def extracted_batch(samples: list[StoredSample], positions: np.ndarray, activations: tuple[np.ndarray, ...],
                    norms: tuple[np.ndarray, ...], output_dtype: str) -> ExtractedBatch:
    """positions: the batch's [rows, S] positions."""
    fields = tuple(
        sample_fields(sequence_token_ids=s.sample.token_ids, positions=positions[s.row, s.columns],
                      output_dtype=output_dtype,
                      sample_id=s.sample.sample_id, source=f"{s.sample.source}:{s.sample.line_number}",
                      task_id=s.sample.task_id, doc_id=s.sample.doc_id, augmentation=s.sample.augmentation)
        for s in samples)
    return ExtractedBatch(tuple(samples), fields, activations, norms, positions, output_dtype)
