"""A loaded checkpoint: config, parameters placed on the host's device mesh, compiled forwards."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from beam_extract.model import compile_cache
from beam_extract.model.config import ModelConfig, config_from_hf, load_hf_config
from beam_extract.model.hooks import parse_hook_name
from beam_extract.model.mesh import batch_sharding, param_shardings, parse_mesh, shard_attention, tree_bytes
from beam_extract.model.qwen2 import SITES, Attention, Hook, attention, forward
from beam_extract.model.weights import load_params, resolve_model_dir, weights_checksum

_LOG = logging.getLogger(__name__)
COMPUTE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(eq=False)  # identity equality keeps it hashable and weak-referenceable
class Model:
    config: ModelConfig
    params: dict  # on the mesh, laid out by param_shardings
    model_dir: Path
    dtype: str
    mesh: Mesh
    # (batch shape, hooks, output dtype) -> compiled forward. Each entry is one XLA compilation.
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    cache_hits: int = dataclasses.field(default=0, repr=False)  # compiles loaded from the persistent cache

    @functools.cached_property
    def weights_sha256(self) -> str:
        return weights_checksum(self.model_dir)

    def compiled(self, shape: tuple[int, int], hooks: tuple[Hook, ...],
                 out_dtype: np.dtype) -> tuple[jax.stages.Compiled, float]:
        """The compiled forward for this batch shape; returns (executable, seconds spent getting it
        now: 0.0 when this model had it already). With the persistent compilation cache on
        (compile_cache.enable_compilation_cache) a program compiled by an earlier process is loaded
        instead: the seconds are then those of lowering and loading, and `cache_hits` counts it."""
        key = (shape, hooks, np.dtype(out_dtype).name)
        with self._lock:
            if key in self._compiled:
                return self._compiled[key], 0.0
            start = time.perf_counter()
            data = batch_sharding(self.mesh, 2)
            attend = self._attention()
            fn = jax.jit(
                lambda params, tokens, positions, segments: {
                    hook: value.astype(out_dtype) for hook, value in
                    forward(params, tokens, positions, segments, config=self.config, hooks=hooks,
                            attend=attend).items()},
                in_shardings=(param_shardings(self.params, self.mesh), data, data, data),
                out_shardings=batch_sharding(self.mesh, 3, memory_kind=self._output_memory),
            )
            arg = jax.ShapeDtypeStruct(shape, jnp.int32)
            # float32 means float32: GPUs would otherwise run float32 matmuls in TF32 and TPUs in
            # bf16 passes (about 1e-3 relative error), silently breaking parity; speed is what
            # --dtype bfloat16 is for. bfloat16 matmuls are unaffected.
            hits = compile_cache.hits_in_this_thread()
            with jax.default_matmul_precision("highest"):
                self._compiled[key] = fn.lower(self.params, arg, arg, arg).compile()
            loaded = compile_cache.hits_in_this_thread() > hits
            if loaded:
                self.cache_hits += 1
            else:
                compile_cache.publish_new_entries()  # a gs:// cache gets the new program (else a no-op)
            seconds = time.perf_counter() - start
            _LOG.info("forward for %s %s in %.2f s", key, "loaded from the compilation cache" if loaded else "compiled",
                      seconds)
            return self._compiled[key], seconds

    @functools.cached_property
    def _output_memory(self) -> str | None:
        """On NVIDIA GPUs the forward writes its outputs straight into pinned host memory: 3.1x the
        rate of copying them out of device memory afterwards (24 layers, B=8 S=2048, an H200).
        Elsewhere outputs stay in device memory (on CPUs that is host memory already)."""
        device = self.mesh.devices.flat[0]
        if device.platform == "gpu" and "pinned_host" in {m.kind for m in device.addressable_memories()}:
            return "pinned_host"
        return None

    def _attention(self) -> Attention:
        """The fused kernel on NVIDIA GPUs for 16-bit compute; else the portable tiled attention
        (float32 stays exact: the kernel's float32 dots would run in TF32), run per shard of the mesh."""
        if self.mesh.devices.flat[0].platform == "gpu" and self.dtype != "float32":
            from beam_extract.model.gpu_attention import flash_attention

            return functools.partial(flash_attention, mesh=self.mesh)
        return shard_attention(attention, self.mesh)

    def forward(self, tokens: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                hooks: tuple[Hook, ...], out_dtype: np.dtype = np.float32,
                rows: int | None = None) -> tuple[dict[Hook, np.ndarray], float]:
        """Host arrays [rows, S, d] in `out_dtype` per (layer, site), and the seconds spent compiling.

        Segment ids: tokens attend to earlier tokens with the same id (0 marks padding); positions
        restart per packed document. Only the first `rows` rows (default all) are returned; where
        outputs stay in device memory, the trailing rows of pure padding never leave it.
        """
        bad = [hook for hook in hooks if not (0 <= hook[0] < self.config.num_layers and hook[1] in SITES)]
        if bad:  # checked here: indexing past the last layer inside jit would silently clamp
            raise ValueError(f"hooks {bad} do not exist in a model of {self.config.num_layers} layers")
        shards = self.mesh.shape["data"]
        if tokens.shape[0] % shards:
            raise ValueError(f"batch of {tokens.shape[0]} rows does not split over the mesh's {shards} data shards")
        executable, seconds = self.compiled(tokens.shape, hooks, out_dtype)
        data = batch_sharding(self.mesh, 2)
        args = [jax.device_put(np.asarray(a, np.int32), data) for a in (tokens, positions, segment_ids)]
        out = executable(self.params, *args)
        if rows is not None and rows < tokens.shape[0] and self._output_memory is None:
            out = {hook: value[:rows] for hook, value in out.items()}  # padding rows stay on the device
        # One call for all hooks: their copies overlap. (One stacked [hooks, B, S, d] array copied
        # 3x slower on an H100.)
        return {hook: value[:rows] for hook, value in jax.device_get(out).items()}, seconds

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
        acts, _ = self.forward(tokens, positions, segment_ids, tuple(sorted(set(hooks.values()))))
        return {name: acts[hook] for name, hook in hooks.items()}


def load_model(path_or_name: str, dtype: str = "float32", mesh: str | Mesh = "auto") -> Model:
    """Loads a Qwen2 checkpoint (embedded name, local dir, gs:// dir or hub id) for `dtype` compute,
    placing the weights once on `mesh` (`auto`, a spec like `data:4,model:2`, or a Mesh)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    model_dir = resolve_model_dir(path_or_name)
    config = config_from_hf(load_hf_config(model_dir))
    params = load_params(config, model_dir, COMPUTE_DTYPES[dtype])
    if not isinstance(mesh, Mesh):
        mesh = parse_mesh(mesh, param_bytes=tree_bytes(params))
    params = jax.device_put(params, param_shardings(params, mesh))
    return Model(config=config, params=params, model_dir=model_dir, dtype=dtype, mesh=mesh)
