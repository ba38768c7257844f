"""Method registry and the walks over parameter trees that every method shares.

A module in a parameter tree is a dict; it is a linear layer when it holds a 2-D `kernel`, a norm
when it holds a 1-D `scale` and a token embedding when it holds a 2-D `embedding`. Paths are tuples of module names, e.g. ('layers_0', 'mlp', 'up_proj').
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import PeftMethod

_METHODS: dict[str, type[PeftMethod]] = {"none": PeftMethod}


def register(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: makes a method available to `get(cls.name, ...)` and to configs."""
    _METHODS[cls.name] = cls
    return cls


def get(name: str, **kwargs: Any) -> PeftMethod:
    """The method called `name`, built with its hyperparameters (e.g. get('lora', r=32, alpha=64))."""
    from jaxrl_peft import peft as _peft  # noqa: F401  (imports every method module so they register)

    if name not in _METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; known: {', '.join(sorted(_METHODS))}")
    try:
        return _METHODS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"PEFT method {name!r}: bad hyperparameters {sorted(kwargs)} ({e})") from e


def from_config(peft_config: Any) -> PeftMethod:
    """The method a config's `peft` block names: `name` and `hparams` (lists become tuples)."""
    hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(peft_config.hparams).items()}
    return get(peft_config.name, **hparams)


def methods() -> list[str]:
    from jaxrl_peft import peft as _peft  # noqa: F401
    return sorted(_METHODS)


def modules(params: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, dict]]:
    """Yields (path, kind, module_dict) for every 'linear', 'norm' and 'embedding' module."""
    kernel, scale, table = params.get("kernel"), params.get("scale"), params.get("embedding")
    if kernel is not None and jnp.ndim(kernel) == 2:
        yield path, "linear", params
    elif scale is not None and jnp.ndim(scale) == 1:
        yield path, "norm", params
    elif table is not None and jnp.ndim(table) == 2:
        yield path, "embedding", params
    for name, sub in params.items():
        if isinstance(sub, dict):
            yield from modules(sub, path + (name,))


def _key_for(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)


def _set(tree: dict, path: tuple[str, ...], leaf_name: str | None, value: Any) -> None:
    node = tree
    for p in path:
        node = node.setdefault(p, {})
    if leaf_name is None:
        node.update(value)
    else:
        node[leaf_name] = value


def nest(items: Iterable[tuple[tuple[str, ...], Any]]) -> dict:
    """A nested dict holding each value at its path (the inverse of flattening with paths)."""
    out: dict = {}
    for path, value in items:
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def _copy(tree: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def init_adapter(method: PeftMethod, key: jax.Array, params: dict) -> tuple[dict, dict]:
    """Returns (params', adapter): the adapter tree for every targeted module, nested like `params`.

    params' equals params except where a residual method (PiSSA, MiLoRA) rewrote a base kernel.
    Each module's key is derived from its path, so the result does not depend on traversal order.
    """
    new_params, adapter = _copy(params), {}
    for path, kind, mod in modules(params):
        if not method.targets(path, kind):
            continue
        k = _key_for(key, path)
        if kind == "linear":
            kernel, a = method.init(k, mod["kernel"], mod.get("bias"), path=path)
            if kernel is not mod["kernel"]:
                _set(new_params, path, "kernel", kernel)
        elif kind == "norm":
            a = method.init_norm(k, mod["scale"], path=path)
        else:
            a = method.init_embedding(k, mod["embedding"], path=path)
        if a:
            _set(adapter, path, None, a)
    if not adapter and method.name != "none":
        raise ValueError(f"PEFT method {method.name!r}: target_modules {method.target_modules} matched no "
                         "module of the model")
    return new_params, adapter


def _adapter_at(adapter: dict, path: tuple[str, ...]) -> dict | None:
    node = adapter
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return None
    return {k: v for k, v in node.items() if not isinstance(v, dict)} or None


def merge(method: PeftMethod, params: dict, adapter: dict) -> dict:
    """Base params with every adapter folded in (for export as a plain HF checkpoint)."""
    if method.replaces_base():  # the trained copies are the weights (the base may hold placeholders)
        merged = method.model_variables(params, adapter)["params"]
        return jax.tree.map(lambda m, p: m.astype(p.dtype), merged, params)
    out = _copy(params)
    for path, kind, mod in modules(params):
        a = _adapter_at(adapter, path)
        if not a:
            continue
        if kind == "linear":
            kernel, bias = method.merge(mod["kernel"], mod.get("bias"), a)
            _set(out, path, "kernel", kernel.astype(mod["kernel"].dtype))
            if bias is not None:
                _set(out, path, "bias", bias.astype(mod["kernel"].dtype))
        elif kind == "norm":
            _set(out, path, "scale", method.norm_scale(mod["scale"], a).astype(mod["scale"].dtype))
        else:
            table = mod["embedding"]
            _set(out, path, "embedding", method.embedding_table(table, a).astype(table.dtype))
    return out


def labels(method: PeftMethod, adapter: dict) -> dict:
    """Optimizer label per adapter leaf (same nesting as `adapter`)."""
    def walk(node: dict) -> dict:
        leaves = {k: v for k, v in node.items() if not isinstance(v, dict)}
        out = dict(method.param_labels(leaves)) if leaves else {}
        out.update({k: walk(v) for k, v in node.items() if isinstance(v, dict)})
        return out
    return walk(adapter)


def trainable_count(method: PeftMethod, adapter: dict) -> int:
    """Number of trained scalars: every adapter leaf except those labelled 'frozen'."""
    counts = jax.tree.map(lambda leaf, lab: 0 if lab == "frozen" else int(np.prod(jnp.shape(leaf))),
                          adapter, labels(method, adapter))
    return int(sum(jax.tree.leaves(counts)))


def map_modules(fn: Callable[[tuple[str, ...], str, dict, dict | None], Any], params: dict,
                adapter: dict) -> list[Any]:
    """Calls fn(path, kind, module_params, module_adapter) for every module; returns the results."""
    return [fn(path, kind, mod, _adapter_at(adapter, path)) for path, kind, mod in modules(params)]


def adapter_axes(method: PeftMethod, param_axes: dict, adapter: dict) -> dict:
    """Logical axis names for every adapter leaf (same nesting as `adapter`), from the axes of the
    weight each module adapts (`param_axes`: the params tree with a tuple of axis names per leaf).
    Model-level leaves outside any module (VeRA's shared projections) get no names (replicated)."""
    def walk(axes_node: Any, adapter_node: dict) -> dict:
        leaves = {k: v for k, v in adapter_node.items() if not isinstance(v, dict)}
        node: dict = {}
        if leaves:
            own = axes_node if isinstance(axes_node, dict) else {}
            kind_leaf = next((own[name] for name in ("kernel", "scale", "embedding") if name in own), None)
            if kind_leaf is None:
                node.update({k: (None,) * jnp.ndim(v) for k, v in leaves.items()})
            else:
                node.update(method.adapter_axes(tuple(kind_leaf), leaves))
        for k, v in adapter_node.items():
            if isinstance(v, dict):
                sub = axes_node.get(k, {}) if isinstance(axes_node, dict) else {}
                node[k] = walk(sub, v)
        return node
    return walk(param_axes, adapter)


def drop_replaced(method: PeftMethod, params: dict, adapter: dict) -> dict:
    """`params` without the base weights that `method` replaces by full trainable copies in `adapter`
    (full fine-tuning): each becomes a scalar placeholder, so the run holds one copy of the model.
    Only valid where nothing needs the base weights themselves (no reference policy)."""
    if not method.replaces_base():
        return params

    def walk(p: Any, a: Any) -> Any:
        if not isinstance(a, dict):
            return jnp.zeros((), p.dtype)
        return {k: walk(v, a[k]) if k in a else v for k, v in p.items()}
    return walk(params, adapter)
