"""Consumers of an output directory for SAE training, outside Beam and JAX.

- `beam_extract.integrations.pytorch`: `ActivationDataset`, a PyTorch `IterableDataset` of shuffled
  float32 [batch_tokens, d_model] token batches, sharded over DataLoader workers and DDP ranks.
- `beam_extract.integrations.saelens`: a data provider for SAELens's `SAETrainer`, and a converter
  to SAELens's cached-activations format (needs the `[saelens]` extra).
- `beam_extract.integrations.shards`: the numpy core both use (sharding of files, mixing buffer).

Importing this package loads none of JAX, Beam, transformers or torch: each consumer's module
imports its own framework, and the reader is imported when a dataset is first built.
"""
