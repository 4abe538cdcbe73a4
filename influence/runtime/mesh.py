"""Device meshes and data-parallel placement.

Every streamed pass (factor fitting and scoring) runs on a :class:`jax.sharding.Mesh`:
the batch axis of each batch is split over the mesh axis ``"data"``, model weights and
fitted factors are replicated, and an optional axis ``"query"`` splits the queries when
scoring. One device is a mesh of size 1, so there is one code path.

The pattern in each jitted step: the forward and backward pass (capture) runs on the
*global* batch under ``jit``, which partitions it by batch without communication (the
per-example computations are independent; only the scalar loss is all-reduced) and draws
the same sampled targets as on one device (partitionable threefry). The contractions
that follow run per device under :func:`jax.shard_map`: sums over a device's rows go to
that device's slot of a ``[n_data, ...]`` accumulator, so nothing is communicated until
the pass ends and the slots are added once.

Several processes (hosts): with ``jax.distributed.initialize`` called first, a mesh over
``jax.devices()`` spans every host; each process passes its own shard of the data and
feeds its rows of every global batch (:func:`shard_batch`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from influence.errors import ConfigError, ConfigTypeError

DATA = "data"
QUERY = "query"
_AXES = (DATA, QUERY)

MeshLike = Mesh | int | Sequence[jax.Device] | None


def resolve_mesh(mesh: MeshLike = None) -> Mesh:
    """A mesh with axis ``"data"`` (and optionally ``"query"``), every axis *auto*-sharded.

    Args:
      mesh: ``None`` (one device: this process's first), an ``int`` n (the first n
        devices of this process, ``jax.local_devices()``), a sequence of devices, or a
        :class:`Mesh` whose axes are named ``"data"`` and optionally ``"query"`` (across
        hosts: a mesh over ``jax.devices()``).
    """
    if mesh is None:
        devices = np.array(jax.local_devices()[:1])
        return Mesh(devices, (DATA,), axis_types=(AxisType.Auto,))
    if isinstance(mesh, int | np.integer) and not isinstance(mesh, bool):
        available = jax.local_devices()
        if not 1 <= mesh <= len(available):
            raise ConfigError(
                f"mesh={mesh} asks for {mesh} devices but {len(available)} are available ({available[0].platform}); "
                "on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N (or jax_num_cpu_devices) "
                "before jax starts to get N host devices"
            )
        return Mesh(np.array(available[:mesh]), (DATA,), axis_types=(AxisType.Auto,))
    if isinstance(mesh, Mesh):
        unknown = [a for a in mesh.axis_names if a not in _AXES]
        if unknown or DATA not in mesh.axis_names:
            raise ConfigError(
                f"the mesh's axes are {mesh.axis_names}; expected 'data' and optionally 'query', e.g. "
                "jax.make_mesh((n,), ('data',)) or jax.make_mesh((n_data, n_query), ('data', 'query'))"
            )
        # Auto axes: the steps rely on jit propagating the batch sharding (an explicit-axis
        # mesh, jax.make_mesh's default in new versions, would type-check every op instead).
        return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    devices = list(mesh)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ConfigTypeError(f"mesh must be None, an int, a sequence of devices or a jax.sharding.Mesh, got {mesh!r}")
    return Mesh(np.array(devices), (DATA,), axis_types=(AxisType.Auto,))


def data_mesh(mesh: MeshLike = None) -> Mesh:
    """``resolve_mesh`` with every device on the data axis (fitting has no query axis)."""
    mesh = resolve_mesh(mesh)
    if mesh.axis_names == (DATA,):
        return mesh
    return Mesh(mesh.devices.reshape(-1), (DATA,), axis_types=(AxisType.Auto,))


def n_data(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def n_query(mesh: Mesh) -> int:
    return int(mesh.shape.get(QUERY, 1))


def query_axis(mesh: Mesh) -> str | None:
    return QUERY if QUERY in mesh.axis_names else None


def mesh_processes(mesh: Mesh) -> int:
    """How many processes (hosts) own devices of the mesh."""
    return len({d.process_index for d in mesh.devices.flat})


def spans_processes(mesh: Mesh) -> bool:
    """Whether the mesh has devices of other processes (several hosts)."""
    return mesh_processes(mesh) > 1


def spec(*axes) -> PartitionSpec:
    return PartitionSpec(*axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The batch axis is split evenly over the data axis; refuse sizes that do not split."""
    n = n_data(mesh)
    if batch_size % n:
        lower, upper = (batch_size // n) * n, math.ceil(batch_size / n) * n
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"batch_size={batch_size} does not split over the {n} devices of the mesh's data axis; "
            f"use a multiple of {n} (e.g. {options})"
        )


def local_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Rows of each global batch that this process supplies."""
    check_batch_size(batch_size, mesh)
    return batch_size // mesh_processes(mesh)


def local_slots(mesh: Mesh) -> int:
    """How many slots of a ``[n_data, ...]`` accumulator live on this process."""
    return n_data(mesh) // mesh_processes(mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of arrays on every device of ``mesh`` (same value everywhere)."""
    sharding = replicated(mesh)
    if not spans_processes(mesh):
        return jax.device_put(tree, sharding)
    # Every process holds the same value: build the global array from local copies.
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their key data
            data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(x)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(one, tree)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Split the leading (batch) axis of every array over the data axis.

    In one process ``tree`` is the whole batch; with several processes it is this
    process's rows, and the global batch is their concatenation in process order.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA))
    if not spans_processes(mesh):
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple[int, ...], dtype: str, mesh: Mesh):
    sharding = NamedSharding(mesh, PartitionSpec(DATA))
    return jax.jit(lambda: jnp.zeros((n_data(mesh), *shape), dtype), out_shardings=sharding)


def zeros_per_device(shape: tuple[int, ...], mesh: Mesh, dtype="float32") -> jax.Array:
    """A ``[n_data, *shape]`` accumulator, one slot per data-axis device, made on that device."""
    return _zeros(tuple(int(s) for s in shape), str(np.dtype(dtype)), mesh)()


def put_per_device(host: np.ndarray, mesh: Mesh) -> jax.Array:
    """Inverse of :func:`per_device_to_host`: ``host [n_data_local, ...]`` back onto the mesh."""
    return shard_batch(np.asarray(host), mesh)


def per_device_to_host(x: jax.Array) -> np.ndarray:
    """This process's slots of a ``[n_data, ...]`` accumulator as numpy (all slots in one process)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _sum_slots(tree):
    return jax.tree.map(lambda x: x.sum(axis=0), tree)


def reduce_slots(tree: Any, mesh: Mesh) -> Any:
    """Add the per-device slots of accumulators: the one cross-device reduction of a pass.
    The totals stay on the devices (replicated); fetch them one layer at a time with
    :func:`to_host` so that the host never holds every layer's float64 copy at once."""
    return jax.jit(_sum_slots, out_shardings=replicated(mesh))(tree)


def to_host(x: jax.Array, dtype=None) -> np.ndarray:
    """A replicated (or single-process) array as numpy (in ``dtype``), on any process."""
    out = np.asarray(x) if x.is_fully_addressable else np.asarray(x.addressable_data(0))
    return out if dtype is None else out.astype(dtype)


def all_processes_sum(value: np.ndarray) -> np.ndarray:
    """Sum a small host array over processes (identity in one process)."""
    if jax.process_count() == 1:
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value))).sum(axis=0)


def all_processes_gather(value: np.ndarray) -> np.ndarray:
    """``[process_count, ...]``: each process's copy of a small host array."""
    if jax.process_count() == 1:
        return np.asarray(value)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def local(fn, mesh: Mesh, in_specs, out_specs):
    """``fn`` run on each device's shard (``jax.shard_map``), for use inside ``jit``."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def describe_mesh(mesh: Mesh) -> dict[str, Any]:
    """JSON-friendly facts about a mesh, for metadata and checkpoints."""
    return {
        "axes": {name: int(size) for name, size in mesh.shape.items()},
        "platform": mesh.devices.flat[0].platform,
        "process_count": jax.process_count(),
    }
