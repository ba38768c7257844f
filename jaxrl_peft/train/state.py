"""The state of a training run and where each piece of it lives.

Frozen base weights, the adapter, the optimizer state and the method state are placed with explicit
shardings: the base by the model's logical axes, the adapter by the method's `adapter_axes` under the
same rules, the optimizer moments like the adapter leaves they belong to. `state_bytes_per_device`
measures what one device holds, from live arrays or from abstract shapes and shardings alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod


@flax.struct.dataclass
class TrainState:
    """What an update changes: the number of updates applied, the adapter, optimizer and method state."""

    step: jax.Array  # int32 scalar
    adapter: Any
    opt_state: Any
    method_state: Any


@dataclasses.dataclass
class Shardings:
    """Placement of every piece of a run's state (trees of NamedSharding)."""

    frozen: dict[str, Any]  # {'base': ...[, 'initial_adapter': ...]}
    train: TrainState


def shardings(method: PeftMethod, tx: optax.GradientTransformation, params: Any, param_axes: Any,
              state: TrainState, mesh: Mesh, initial_adapter: bool = False) -> Shardings:
    """Shardings for `params` (logical axes `param_axes`; placeholders replicated), for `state`, and
    for a frozen copy of the initial adapter (placed like the adapter) when `initial_adapter`."""
    replicated = mesh_lib.replicated(mesh)
    param_sh = jax.tree.map(lambda x, axes: mesh_lib.fitted_sharding(axes, x.shape, mesh) if x.ndim else replicated,
                            params, param_axes)
    adapter_axes = registry.adapter_axes(method, param_axes, state.adapter)
    adapter_sh = mesh_lib.tree_shardings(adapter_axes, state.adapter, mesh)
    opt_sh = like_adapter(state.opt_state, state.adapter, adapter_sh, replicated)
    method_sh = jax.tree.map(lambda _: replicated, state.method_state)
    frozen = {"base": param_sh, **({"initial_adapter": adapter_sh} if initial_adapter else {})}
    return Shardings(frozen, TrainState(replicated, adapter_sh, opt_sh, method_sh))


def _dict_path(key_path: tuple) -> tuple[str, ...]:
    """The trailing run of dict keys of a key path: an optimizer-state leaf's adapter path."""
    names: list[str] = []
    for k in reversed(key_path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        names.append(str(k.key))
    return tuple(reversed(names))


def like_adapter(opt_state: Any, adapter: Any, adapter_sh: Any, other: NamedSharding) -> Any:
    """Shardings for an optimizer state: a leaf shaped like the adapter leaf at its path (Adam's
    moments, LoRA-FA's) is placed like that leaf; counts, scalars and anything else get `other`."""
    by_path = {_dict_path(kp): (np.shape(x), sh) for (kp, x), sh in zip(
        jax.tree_util.tree_flatten_with_path(adapter)[0], jax.tree.leaves(
            adapter_sh, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)))}

    def one(kp, x):
        shape, sh = by_path.get(_dict_path(kp), (None, other))
        return sh if shape == np.shape(x) else other
    return jax.tree_util.tree_map_with_path(one, opt_state)


def place(tree: Any, tree_shardings: Any) -> Any:
    """Puts every leaf on its devices; copies leaves that alias another leaf, since a donated buffer
    may appear only once (PiSSA's adapter held its initial factors twice)."""
    seen: set[int] = set()

    def one(x, sh):
        if isinstance(x, jax.Array):
            key = id(x)
            if key in seen:
                x = jnp.copy(x)
            seen.add(key)
        return jax.device_put(x, sh)
    return jax.tree.map(one, tree, tree_shardings)


def state_bytes_per_device(trees: Any) -> int:
    """The most bytes that any one device holds of `trees`, read from the live arrays' shards."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(trees):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def abstract_bytes_per_device(abstract: Any, tree_shardings: Any) -> int:
    """The same figure from shapes and shardings alone (no array exists): the largest device total of
    the shard shapes that each sharding assigns to each device."""
    per_device: dict[Any, int] = {}
    for x, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(
            tree_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))):
        nbytes = int(np.prod(sh.shard_shape(x.shape), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
        for device in sh.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)
