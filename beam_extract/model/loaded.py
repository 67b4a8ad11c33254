"""A loaded checkpoint: config, parameters on device, and the hooked forward."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from beam_extract.model.config import ModelConfig, config_from_hf, load_hf_config
from beam_extract.model.hooks import parse_hook_name
from beam_extract.model.qwen2 import Hook, forward_jit
from beam_extract.model.weights import load_params, resolve_model_dir, weights_checksum

COMPUTE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(eq=False)  # identity equality keeps it hashable and weak-referenceable
class Model:
    config: ModelConfig
    params: dict
    model_dir: Path
    dtype: str

    @functools.cached_property
    def weights_sha256(self) -> str:
        return weights_checksum(self.model_dir)

    def forward(
        self, tokens: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray, hooks: tuple[Hook, ...]
    ) -> dict[Hook, jax.Array]:
        """Device arrays [B, S, d] per (layer, site). Segment ids: same id = same document; see qwen2."""
        return forward_jit(self.params, tokens, positions, segment_ids, config=self.config, hooks=hooks)

    def run_with_cache(
        self, input_ids: np.ndarray, names: Sequence[str], lengths: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Activations for right-padded rows: hook name -> float32 [B, S, d_model].

        Positions past a row's length are padding: they never influence real tokens, and their
        values are meaningless.
        """
        tokens = np.asarray(input_ids, dtype=np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tokens.shape}")
        batch, seq = tokens.shape
        lengths = np.full(batch, seq) if lengths is None else np.asarray(lengths)
        if lengths.shape != (batch,) or (lengths < 1).any() or (lengths > seq).any():
            raise ValueError(f"lengths must be {batch} values in 1..{seq}, got {lengths.tolist()}")
        hooks = {name: parse_hook_name(name, self.config.num_layers) for name in names}
        positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
        segment_ids = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
        acts = self.forward(tokens, positions, segment_ids, tuple(sorted(set(hooks.values()))))
        return {name: np.asarray(acts[hook].astype(jnp.float32)) for name, hook in hooks.items()}


def load_model(path_or_name: str, dtype: str = "float32") -> Model:
    """Loads a Qwen2 checkpoint (embedded name, local dir, gs:// dir or hub id) for `dtype` compute."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    model_dir = resolve_model_dir(path_or_name)
    config = config_from_hf(load_hf_config(model_dir))
    params = jax.device_put(load_params(config, model_dir, COMPUTE_DTYPES[dtype]))
    return Model(config=config, params=params, model_dir=model_dir, dtype=dtype)
