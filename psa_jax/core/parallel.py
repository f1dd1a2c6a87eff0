"""Mesh and shardings from config: logical axis names in the modules, mesh axes in the rules.

The mesh has three named axes (MaxText style): ``data`` (pure data parallel), ``fsdp`` (data
parallel whose parameters and optimizer state are sharded too) and ``tensor`` (model parallel).
Modules tag every weight with logical names (``("embed", "heads")``); ``config.mesh.
logical_axis_rules`` maps each name to mesh axes. Changing the parallelism is a config change.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes
log = logging.getLogger(__name__)
T = TypeVar("T")


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve ``{"data": -1, "fsdp": 2, "tensor": 1}`` against ``num_devices`` (one -1 allowed)."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape {dict(shape)}: sizes must be >= 1, with at most one -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(shape)} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"there are {num_devices}"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all, every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(mesh_config.shape), len(devices))
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        # Topology-aware order on real accelerators (ICI rings); a plain reshape on CPU.
        array = mesh_utils.create_device_mesh(shape, devices)
    else:
        array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(array, MESH_AXES)


def local_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """This process's devices (default: the default backend's) on the ``data`` axis
    (data-parallel sampling on one host); None with a single device."""
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) == 1:
        return None
    return Mesh(np.asarray(devices, dtype=object).reshape(len(devices), 1, 1), MESH_AXES)


def sampling_mesh(batch_size: int) -> Mesh | None:
    """The mesh one process's sampling splits its chunks of ``batch_size`` over: this
    process's devices, as many as divide the chunk (:func:`local_data_mesh`); None with one
    device, or with many processes (they split the plan among themselves instead)."""
    if jax.process_count() > 1:
        return None
    devices = jax.local_devices()
    return local_data_mesh(devices[: math.gcd(len(devices), batch_size)])


def logical_rules(mesh_config: Any) -> tuple[tuple[str, Any], ...]:
    """``config.mesh.logical_axis_rules`` as the tuple Flax's partitioning helpers take."""
    rules = []
    for name, axes in mesh_config.logical_axis_rules:
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        rules.append((str(name), axes))
    return tuple(rules)


def with_logical_axes(fn: Callable[..., T], mesh: Mesh, rules: Sequence) -> Callable[..., T]:
    """``fn`` whose body runs under ``mesh`` and the logical-axis ``rules``, so that the modules'
    activation constraints (``nn.with_logical_constraint(x, ("act_batch", ...))``, no-ops outside
    such a context) take effect where ``fn`` is traced. Wrap the function given to ``jax.jit``:
    the context is entered inside the trace, whoever calls or lowers the jitted function.

    Flax applies a constraint only under an abstract mesh (``jax.sharding.get_abstract_mesh()``;
    the legacy ``with mesh:`` does not set one, and ``jax.set_mesh`` cannot be entered inside
    ``jax.jit``), hence ``use_abstract_mesh``.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return wrapped


def under_mesh_rules(fn: Callable[..., T], mesh: Mesh, mesh_config: Any) -> Callable[..., T]:
    """:func:`with_logical_axes` with the rules of ``config.mesh`` (how the train step and the
    evaluator are traced)."""
    return with_logical_axes(fn, mesh, logical_rules(mesh_config))


def _axes_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(
    shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Sequence
) -> PartitionSpec:
    """Mesh partition spec for one array with logical ``names``.

    A dimension that its mesh axes do not divide is replicated instead (logged once per shape):
    tiny models and odd channel counts (SD's 320/640/1280 over 3 devices) must still run.
    """
    mesh_axes = nn.logical_to_mesh_axes(tuple(names), rules)
    spec = []
    for size, axes in zip(shape, mesh_axes):
        if axes is not None and size % _axes_size(mesh, axes):
            log.info("dim of size %d not divisible by mesh axes %s: replicated", size, axes)
            axes = None
        spec.append(axes)
    return PartitionSpec(*spec)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
    """``NamedSharding`` for every leaf of a tree of ``nn.LogicallyPartitioned`` boxes (as
    ``jax.eval_shape(module.init, ...)`` returns). Unboxed leaves are replicated."""

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return _axes_size(mesh, BATCH_AXES)


def interleave_rows(*arrays: jax.Array) -> jax.Array:
    """``[a0, b0, a1, b1, ...]``: the rows of equally shaped batch-major arrays, side by side.

    The way to batch a pair's two images (or CFG's two branches) under data parallelism: every
    device keeps its own rows. ``concatenate([a, b])`` puts ``a``'s rows on the first devices
    and ``b``'s on the last, an all-to-all per input and a collective-permute per slice back.
    """
    return jnp.stack(arrays, axis=1).reshape(-1, *arrays[0].shape[1:])


def split_rows(x: jax.Array, k: int) -> tuple[jax.Array, ...]:
    """The ``k`` arrays that :func:`interleave_rows` interleaved into ``x``."""
    if x.shape[0] % k:
        raise ValueError(f"{x.shape[0]} rows do not split into {k} interleaved arrays")
    y = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    return tuple(y[:, i] for i in range(k))


def put_tree(tree: Any, shardings: Any) -> Any:
    """Place a host pytree (numpy / single-device arrays) on the mesh with ``shardings``.

    Every process must pass the same full values (frozen weights read from disk, a seeded init).
    """

    def one(x: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


# -- processes ---------------------------------------------------------------------------------


def barrier(name: str, timeout_s: int = 4 * 3600) -> None:
    """Wait until every process reaches ``name`` (unique per call site and run).

    A key-value barrier of the coordination service, not a device collective: a collective
    would start CPU/gloo communication, whose context set-up times out after 30 s while one
    process is still building data or compiling encoders.
    """
    if jax.process_count() > 1:
        sync = multihost.get_barrier_sync_fn()
        sync(key=f"psa_jax:{name}", timeout_ms=timeout_s * 1000)


def process_zero_first(fn: Callable[[], T], tag: str) -> T:
    """Run ``fn`` on process 0, then on the others (which find its files on a shared file
    system, or make their own). One process: just ``fn()``."""
    if jax.process_count() == 1:
        return fn()
    out = fn() if jax.process_index() == 0 else None
    barrier(f"{tag}:0")
    if jax.process_index() != 0:
        out = fn()
    barrier(f"{tag}:1")
    return out
