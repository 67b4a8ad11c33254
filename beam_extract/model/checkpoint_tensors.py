"""Which checkpoint tensors a config reads, where each is stored and its shape: the family table
(families.py) and the logical axes (param_axes.py) read for one `ModelConfig`. No file is opened
here: loading (weights.py) and the generated checkpoints (embedded.py) both build on it.
"""

from __future__ import annotations

from beam_extract.model.config import ModelConfig
from beam_extract.model.families import FAMILIES, Stored, layer_tensors
from beam_extract.model.param_axes import GLOBAL_AXES, LAYER_AXES


def param_shape(config: ModelConfig, name: str, per_layer: bool) -> tuple[int, ...]:
    """Our parameter's shape (one layer's, for a layer parameter), from its logical axes."""
    sizes = {"vocab": config.vocab_size, "embed": config.hidden_size, "heads": config.num_heads * config.head_dim,
             "kv": config.num_kv_heads * config.head_dim, "mlp": config.intermediate_size,
             "head_dim": config.head_dim, "positions": config.max_position_embeddings}
    return tuple(sizes[axis] for axis in (LAYER_AXES if per_layer else GLOBAL_AXES)[name])


def _stored_shape(stored: Stored, shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = shape[::-1] if stored.transpose else shape
    return (*shape[:-1], shape[-1] * stored.parts)


def stored_params(config: ModelConfig) -> list[tuple[str, int | None, Stored, str]]:
    """(our name, layer or None, where it is stored, the checkpoint's name without the family's
    prefix) for every parameter we load, whole-model ones first, in the family table's order."""
    family = FAMILIES[config.family]
    globals_ = [(name, None, stored, stored.name) for name, stored in family.globals.items()
                if name != "pos_embed" or config.learned_positions]
    per_layer = layer_tensors(config).items()
    layers = [(name, index, stored, f"{family.layers}.{index}.{stored.name}")
              for index in range(config.num_layers) for name, stored in per_layer]
    return globals_ + layers


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name (without the family's prefix) -> shape, for every tensor we load."""
    return {key: _stored_shape(stored, param_shape(config, name, index is not None))
            for name, index, stored, key in stored_params(config)}
