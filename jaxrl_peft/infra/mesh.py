"""Device mesh from config and the one table from logical axis names to mesh axes.

Models only name logical axes (`embed`, `mlp`, `heads`, ...); this file decides where they go.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes). Parameters are sharded over `fsdp` along `embed` and over
# `tensor` along the wide dimension; activations' batch over `data` and `fsdp`.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("rank", None),
    ("length", None),
    ("layers", None),  # the leading axis of scanned (stacked) decoder layers
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} ({shape})")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(shape))} but there are "
                         f"{len(devices)} devices ({dict(zip(MESH_AXES, shape))})")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_sharding(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """Maps a tree of logical PartitionSpecs (or axis-name tuples) to NamedShardings."""
    def one(spec):
        spec = spec if isinstance(spec, P) else P(*spec)
        return nn.logical_to_mesh_sharding(spec, mesh, rules)
    return jax.tree.map(one, logical_specs, is_leaf=lambda x: isinstance(x, (P, tuple)))


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a (possibly abstract) tree of `nn.LogicallyPartitioned` params."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_abstract), mesh, rules)


def fitted_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> NamedSharding:
    """The NamedSharding of logical `axes` for an array of `shape`; a dimension that the mesh axes it
    maps to do not divide evenly is replicated instead (e.g. 2 KV heads over 4 tensor shards)."""
    spec = nn.logical_to_mesh_axes(tuple(axes), rules)
    fitted = []
    for dim, mesh_axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        fitted.append(mesh_axes if names and dim % size == 0 else None)
    return NamedSharding(mesh, P(*fitted))


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """`fitted_sharding` over a tree of logical-axis tuples and the matching tree of arrays/shapes."""
    return jax.tree.map(lambda x, axes: fitted_sharding(axes, x.shape, mesh, rules), shapes_tree, axes_tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shards the leading (batch) axis over data and fsdp, replicates the rest."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------- host <-> global batches
# With several JAX processes (hosts of a pod) each host holds only its own rows of a batch. These three
# helpers are the only crossing points; with one process they are device_put, device_get and identity.

def host_batch(local: Any, mesh: Mesh) -> jax.Array:
    """This host's rows [b, ...] -> the global batch [b * hosts, ...] sharded over ('data', 'fsdp')."""
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, max(local.ndim, 1)), local)


def local_rows(batch: jax.Array, mesh: Mesh) -> np.ndarray:
    """The rows of a global batch that `host_batch` took from this host, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(batch))
    from jax.experimental import multihost_utils
    spec = P(("data", "fsdp"), *([None] * (batch.ndim - 1)))
    return np.asarray(multihost_utils.global_array_to_host_local_array(batch, mesh, spec))


def gather_hosts(local: Any) -> np.ndarray:
    """Every host's `local` array (or scalar), concatenated along axis 0 in process order."""
    local = np.atleast_1d(np.asarray(local))
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def gather_json(obj: Any) -> list:
    """Every host's JSON-serialisable `obj`, in process order."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = gather_hosts(raw.size)
    buf = np.zeros((1, int(sizes.max())), np.uint8)
    buf[0, :raw.size] = raw
    every = gather_hosts(buf)
    return [json.loads(bytes(row[:n])) for row, n in zip(every, sizes)]
