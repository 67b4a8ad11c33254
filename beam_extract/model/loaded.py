"""A loaded checkpoint: config, parameters placed on the host's device mesh, compiled forwards."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from beam_extract.hooks import SITES, Hook, parse_hook_name
from beam_extract.model import compile_cache
from beam_extract.model.config import COMPUTE_DTYPES, ModelConfig
from beam_extract.model.hf_config import config_from_hf, load_hf_config
from beam_extract.model.mesh import batch_sharding, param_shardings, parse_mesh, shard_attention, tree_bytes
from beam_extract.model.decoder import Attention, attention, forward
from beam_extract.model.weights import load_params, resolve_model_dir, weights_checksum

_LOG = logging.getLogger(__name__)


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
                lambda params, tokens, positions, segments: _outputs(
                    forward(params, tokens, positions, segments, config=self.config, hooks=hooks, attend=attend),
                    out_dtype),
                in_shardings=(param_shardings(self.params, self.mesh), data, data, data),
                out_shardings=(batch_sharding(self.mesh, 3, memory_kind=self._output_memory),
                               batch_sharding(self.mesh, 2)),
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
        """For 16-bit compute, the fused kernel of the platform: Pallas flash attention (Triton) on
        NVIDIA GPUs, splash attention on TPUs (for the head sizes it is known to lower); else the
        portable tiled attention, run per shard of the mesh. float32 stays exact: the kernels'
        float32 dots would run in TF32 or bf16 passes. Sliding windows (per layer, a value of the
        layer scan) and soft-capped scores are computed by the portable attention only."""
        platform = self.mesh.devices.flat[0].platform
        if self.config.sliding or self.config.attn_softcap is not None:
            return shard_attention(attention, self.mesh)
        if platform == "gpu" and self.dtype != "float32":
            from beam_extract.model.gpu_attention import flash_attention

            return functools.partial(flash_attention, mesh=self.mesh)
        if platform == "tpu" and self.dtype != "float32":
            from beam_extract.model import tpu_attention

            if tpu_attention.supported(platform, COMPUTE_DTYPES[self.dtype], self.config.head_dim):
                return functools.partial(tpu_attention.splash_attention, mesh=self.mesh)
        return shard_attention(attention, self.mesh)

    def dispatch(self, tokens: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                 hooks: tuple[Hook, ...], out_dtype: np.dtype = np.float32, rows: int | None = None) -> Dispatched:
        """Starts the forward on the devices and returns at once (compiling first if this shape is
        new); `Dispatched.fetch` waits for its outputs on the host.

        Segment ids: tokens attend to earlier tokens with the same id (0 marks padding); positions
        restart per packed document. Only the first `rows` rows (default all) are fetched; where
        outputs stay in device memory, the trailing rows of pure padding never leave it.
        """
        bad = [hook for hook in hooks if not (0 <= hook[0] < self.config.num_layers and hook[1] in SITES)]
        if bad:  # checked here: indexing past the last layer inside jit would silently clamp
            raise ValueError(f"hooks {bad} do not exist in a model of {self.config.num_layers} layers")
        learned = self.config.learned_positions
        if learned and len(positions) and np.max(positions) >= self.config.max_position_embeddings:
            # an embedding lookup past the table would silently read its last row
            raise ValueError(f"position {int(np.max(positions))} has no learned embedding (the model has "
                             f"{self.config.max_position_embeddings})")
        shards = self.mesh.shape["data"]
        if tokens.shape[0] % shards:
            raise ValueError(f"batch of {tokens.shape[0]} rows does not split over the mesh's {shards} data shards")
        began, hits = time.perf_counter(), compile_cache.hits_in_this_thread()
        executable, seconds = self.compiled(tokens.shape, hooks, out_dtype)
        data = batch_sharding(self.mesh, 2)
        args = [jax.device_put(np.asarray(a, np.int32), data) for a in (tokens, positions, segment_ids)]
        activations, norms = executable(self.params, *args)
        if rows is not None and rows < tokens.shape[0] and self._output_memory is None:
            activations = {hook: value[:rows] for hook, value in activations.items()}  # padding rows stay
        return Dispatched(activations, norms, rows, seconds, began,
                          bool(seconds) and compile_cache.hits_in_this_thread() > hits)

    def forward(self, tokens: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                hooks: tuple[Hook, ...], out_dtype: np.dtype = np.float32,
                rows: int | None = None) -> tuple[dict[Hook, np.ndarray], float]:
        """Host arrays [rows, S, d] in `out_dtype` per (layer, site), and the seconds spent compiling
        (see `dispatch`)."""
        dispatched = self.dispatch(tokens, positions, segment_ids, hooks, out_dtype, rows)
        return dispatched.fetch()[0], dispatched.compile_seconds

    def run_with_cache(
        self, input_ids: np.ndarray, names: Sequence[str], lengths: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Activations for right-padded rows: hook name -> float32 [B, S, width] (d_model; n_heads * d_head
        for attn.hook_z, d_mlp for mlp.hook_post).

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


def token_norms(value: jax.Array) -> jax.Array:
    """[..., d] -> [...]: each token's L2 norm in float32, NaN where any element is NaN or infinite.
    Scaled by the largest element first, so the norm of finite 16-bit values never overflows (their
    squares can: the host squares in float64)."""
    x = value.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    safe = jnp.where(scale > 0, scale, 1.0)
    norm = safe[..., 0] * jnp.sqrt(jnp.sum(jnp.square(x / safe), axis=-1))
    return jnp.where(jnp.isfinite(x).all(axis=-1), norm, jnp.nan)


def _outputs(activations: dict[Hook, jax.Array], out_dtype: np.dtype) -> tuple[dict, dict]:
    """The forward's outputs: activations in the output dtype, and their tokens' norms, computed on
    the device so the host never converts or reduces activations."""
    stored = {hook: value.astype(out_dtype) for hook, value in activations.items()}
    return stored, {hook: token_norms(value) for hook, value in stored.items()}


@dataclasses.dataclass(frozen=True)
class Dispatched:
    """A forward in flight: device arrays (or, on GPUs, pinned host arrays) still being computed."""

    activations: dict[Hook, jax.Array]
    norms: dict[Hook, jax.Array]
    rows: int | None
    compile_seconds: float
    dispatched: float  # time.perf_counter() when it was started, compiling included
    compile_cached: bool = False  # its compile was a load from the persistent compilation cache

    def fetch(self) -> tuple[dict[Hook, np.ndarray], dict[Hook, np.ndarray]]:
        """Waits for the outputs: host arrays [rows, S, d] per hook and their tokens' norms [rows, S]."""
        # One call for everything: the copies overlap. (One stacked [hooks, B, S, d] array copied
        # 3x slower on an H100.)
        activations, norms = jax.device_get((self.activations, self.norms))
        rows = self.rows
        return ({hook: value[:rows] for hook, value in activations.items()},
                {hook: value[:rows] for hook, value in norms.items()})


def load_model(path_or_name: str, dtype: str = "float32", mesh: str | Mesh = "auto") -> Model:
    """Loads a checkpoint of any family (embedded name, local dir, gs:// dir or hub id) for `dtype` compute,
    placing the weights once on `mesh` (`auto`, a spec like `data:4,model:2`, or a Mesh)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    model_dir = resolve_model_dir(path_or_name)
    config = config_from_hf(load_hf_config(model_dir))
    params = load_params(config, model_dir, COMPUTE_DTYPES[dtype])
    if not isinstance(mesh, Mesh):
        mesh = parse_mesh(mesh, param_bytes=tree_bytes(params))
    params = jax.device_put(params, param_shardings(params, mesh))
    # device_put keeps its numpy inputs alive until XLA's next garbage pass (jax-ml/jax#14882), which
    # a compile runs but a forward loaded from the compilation cache does not: the host copy of the
    # weights then lived through the first batch (peak RSS 2862 vs 2484 MiB, 0.5B widths, 4 layers).
    # A collection runs that pass (JAX hooks it into gc.callbacks).
    gc.collect()
    return Model(config=config, params=params, model_dir=model_dir, dtype=dtype, mesh=mesh)
