"""A device that computes nothing: `SimulatedModel` keeps Model.dispatch's contract, and its outputs
(fixed random buffers, as pinned host buffers would be) are ready `computed tokens / rate` seconds
after it is free (an accelerator's queue). It imports numpy only, so a job that uses it (a child
process of the host benchmarks) pays for no import that a real job would not."""

from __future__ import annotations

import time
import types

import numpy as np

D_MODEL = 896  # Qwen2.5-0.5B's


class SimulatedForward:
    def __init__(self, activations: dict, norms: dict, rows: int | None, ready: float):
        self._outputs, self.rows, self.ready = (activations, norms), rows, ready
        self.compile_seconds, self.compile_cached, self.dispatched = 0.0, False, time.perf_counter()

    def fetch(self):
        time.sleep(max(0.0, self.ready - time.perf_counter()))
        activations, norms = self._outputs
        return ({h: v[: self.rows] for h, v in activations.items()}, {h: v[: self.rows] for h, v in norms.items()})


class SimulatedModel:
    """Model.dispatch's contract; outputs are fixed random buffers (as pinned host buffers would be)."""

    def __init__(self, rate: float = float("inf"), width: int = D_MODEL):
        self._width = width
        self.mesh = types.SimpleNamespace(shape={"data": 1}, devices=np.array([types.SimpleNamespace(platform="sim")]))
        self.rate, self._free, self._buffers = rate, 0.0, {}

    def dispatch(self, tokens, positions, segment_ids, hooks, out_dtype=np.float32, rows=None):
        now = time.perf_counter()
        self._free = max(now, self._free) + tokens.size / self.rate
        values, norms = self._outputs(tokens.size, np.dtype(out_dtype))
        values = values[: tokens.size * self._width].reshape(*tokens.shape, self._width)
        norms = norms[: tokens.size].reshape(tokens.shape)
        return SimulatedForward({h: values for h in hooks}, {h: norms for h in hooks}, rows, self._free)

    def _outputs(self, tokens: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """Flat random outputs for at least `tokens` tokens, made again only for a larger batch: each
        batch's outputs are views of them, so the host's CPU makes no device output (a job with many
        batch shapes made one per shape, ~0.3 CPU-s each at 8 x 2048 tokens)."""
        made = self._buffers.get(dtype.name)
        if made is None or len(made[1]) < tokens:
            rng = np.random.default_rng(0)
            made = (rng.standard_normal(tokens * self._width, np.float32).astype(dtype),
                    rng.uniform(100, 200, tokens).astype(np.float32))
            self._buffers[dtype.name] = made
        return made
