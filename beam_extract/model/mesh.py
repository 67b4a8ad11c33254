"""The per-host device mesh ("data", "model") and how parameters are laid out on it.

Each parameter names its logical axes; one rules table maps logical axes to mesh axes
(Megatron-style: q/k/v/gate/up split on output columns, o/down on input rows, the embedding on
the vocabulary). Changing the layout is editing RULES, not matching parameter names.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from beam_extract.model.param_axes import GLOBAL_AXES, LAYER_AXES

AXES = ("data", "model")

RULES = {"vocab": "model", "heads": "model", "kv": "model", "mlp": "model", "embed": None, "layers": None,
         "head_dim": None, "positions": None}

# `auto` keeps the weights whole on each device while they take at most this share of its memory.
AUTO_WEIGHT_SHARE = 0.5


def mesh_sizes(spec: str, devices: int | None = None) -> dict[str, int] | None:
    """The axis sizes of `data:4,model:2` (None for `auto`), checked against a device count when it
    is known (the driver of a local job sees the workers' devices)."""
    if spec == "auto":
        return None
    sizes = {"data": 1, "model": 1}
    for part in spec.split(","):
        name, _, size = part.strip().partition(":")
        if name not in AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {spec!r}: expected 'auto' or axes like data:4,model:2")
        sizes[name] = int(size)
    if devices is not None and sizes["data"] * sizes["model"] != devices:
        raise ValueError(f"--mesh {spec!r} covers {sizes['data'] * sizes['model']} devices; this host has {devices}")
    return sizes


def parse_mesh(spec: str, devices: list | None = None, param_bytes: int = 0) -> Mesh:
    """`auto` or `data:4,model:2` over `devices` (default: this host's local devices, all of them)."""
    devices = list(devices if devices is not None else local_devices())
    n = len(devices)
    sizes = mesh_sizes(spec, n)
    if sizes is None:
        model = _auto_model_axis(devices, param_bytes)
        sizes = {"data": n // model, "model": model}
    return Mesh(np.asarray(devices).reshape(sizes["data"], sizes["model"]), AXES)


def local_devices() -> list:
    """This host's devices; a TPU held by another process is a clear error, not a hang or a crash."""
    try:
        return jax.local_devices()
    except RuntimeError as error:
        if "TPU" in str(error) or "tpu" in str(error):
            raise RuntimeError(
                "could not open this worker's TPU, most likely because another process holds it. Only one "
                "process may own the chips: on Dataflow pass --experiments=no_use_multiple_sdk_containers "
                f"(and few harness threads). JAX said: {error}") from error
        raise


def _auto_model_axis(devices: list, param_bytes: int) -> int:
    """The smallest split of the weights over devices that leaves room for activations."""
    stats = devices[0].memory_stats() or {}
    capacity = stats.get("bytes_limit")
    if not capacity:  # CPU: no device memory limit to plan against
        return 1
    for model in range(1, len(devices) + 1):
        if len(devices) % model == 0 and param_bytes / model <= AUTO_WEIGHT_SHARE * capacity:
            return model
    raise ValueError(f"weights of {param_bytes / 2**30:.1f} GiB do not fit {len(devices)} devices of "
                     f"{capacity / 2**30:.1f} GiB")


def _spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The rule's mesh axis for each dimension, or replication where the size does not divide."""
    spec = []
    for axis, size in zip(axes, shape):
        mesh_axis = RULES[axis]
        spec.append(mesh_axis if mesh_axis and size % mesh.shape[mesh_axis] == 0 else None)
    return PartitionSpec(*spec)


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """A NamedSharding for every parameter, by its logical axes and RULES."""
    def sharding(axes, p):
        return NamedSharding(mesh, _spec(axes, p.shape, mesh))

    return {name: {n: sharding(("layers", *LAYER_AXES[n]), p) for n, p in value.items()} if name == "layers"
            else sharding(GLOBAL_AXES[name], value) for name, value in params.items()}


def batch_sharding(mesh: Mesh, ndim: int, memory_kind: str | None = None) -> NamedSharding:
    """Batch-major arrays: rows split over "data", everything else whole (in `memory_kind`, default
    the devices' own memory)."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))), memory_kind=memory_kind)


def tree_bytes(params: dict) -> int:
    return sum(math.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params))


def shard_attention(attend: Callable, mesh: Mesh) -> Callable:
    """`attend` (the contract of decoder.attention: q [B, S, KV, G, D], k/v [B, S, KV, D], segment ids
    [B, S], options) run on each device over its own rows ("data") and, where they divide, its own k/v
    heads ("model"). Each device then decides alone which of its tiles to skip: over the global arrays
    the skip predicate would be an all-reduce inside the tile loop, one collective per tile. (No
    varying-axes check: the tile loop's initial state is a constant, its updates vary per device.)
    A layer's sliding window, a traced scalar of the layer scan, goes in whole to every device."""

    def sharded(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                window: jax.Array | None = None, **options) -> jax.Array:
        heads = "model" if q.shape[2] % mesh.shape["model"] == 0 else None  # else each keeps all heads
        q_spec, kv_spec = PartitionSpec("data", None, heads, None, None), PartitionSpec("data", None, heads, None)
        windowed = () if window is None else (window,)

        def run(q, k, v, segment_ids, *window):
            return attend(q, k, v, segment_ids, **options, **({"window": window[0]} if window else {}))

        return jax.shard_map(run, mesh=mesh, out_specs=q_spec, check_vma=False,
                             in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec("data", None),
                                       *(PartitionSpec(),) * len(windowed)))(q, k, v, segment_ids, *windowed)

    return sharded
