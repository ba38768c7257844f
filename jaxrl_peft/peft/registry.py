"""Method registry and the walks over parameter trees that every method shares.

A module in a parameter tree is a dict; it is a linear layer when it holds a 2-D `kernel`, a norm
when it holds a 1-D `scale` and a token embedding when it holds a 2-D `embedding`. Paths are tuples of module names, e.g. ('layers_0', 'mlp', 'up_proj').
Every other parameter leaf (a norm's bias, RWKV-7's token-shift mixes and decay vectors, ...) is of
kind 'leaf': a method that lists 'leaf' in its kinds (full fine-tuning) gets it via `init_leaf`.

A composite method (`parts.py`: a method of its own per top-level key of the tree, e.g. full fine-tuning
for a connector and LoRA for the language model) is walked part by part: each part's subtree is a model
of its own to its method (paths, target patterns and the stacked layout are relative to the part), and
the results are nested under the part's key again.

Layers may be stacked: one top-level subtree (`STACKS`: the decoder's `layers`, RWKV-7's `blocks`) whose
leaves carry a leading layer axis (the model runs them under `nn.scan`). The walks below see such a tree
layer by layer, with the unstacked paths `layers_<i>/...` (`blocks_<i>/...`), so methods, target
patterns and keys are the same in both layouts; what they write back is stacked again. A stack may
start after layer 0: RWKV-7's block 0 differs from the others (ln0, no value residual) and stays
`blocks_0` beside the stacked `blocks` (blocks 1 ... L-1). When a method's adapter differs between
the stacked layers (per-layer targets), `init_adapter` returns the unrolled layout (`layers_0` ...
`layers_{L-1}`), which the models also run.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import PeftMethod

_METHODS: dict[str, type[PeftMethod]] = {"none": PeftMethod}

# The top-level subtrees that may hold stacked layers -> the index of the first layer they hold; the
# unrolled layer i of stack `s` is named `s_<i>`, and the layers below the first stay unrolled.
STACKS = {"layers": 0, "blocks": 1}  # the decoder's layers; RWKV-7's blocks 1 ... L-1 (block 0 differs)
LAYERS = "layers"  # the decoder's
_LAYER_NAME = re.compile(rf"({'|'.join(STACKS)})_(\d+)")


def register(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: makes a method available to `get(cls.name, ...)` and to configs."""
    _METHODS[cls.name] = cls
    return cls


def get(name: str, **kwargs: Any) -> PeftMethod:
    """The method called `name`, built with its hyperparameters (e.g. get('lora', r=32, alpha=64)).

    Every method module registers itself when `jaxrl_peft.peft` is imported, which importing this
    module (`jaxrl_peft.peft.registry`) always does first."""
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
    return sorted(_METHODS)


# ------------------------------------------------------------------------ stacked <-> unrolled layers

def layer_index(name: str) -> int | None:
    """i for an unrolled layer's name 'layers_<i>' (or 'blocks_<i>'), else None."""
    match = _LAYER_NAME.fullmatch(name)
    return int(match.group(2)) if match else None


def stack_of(name: str) -> str | None:
    """The stacked subtree that holds the unrolled layer `name` in the stacked layout ('layers_3' ->
    'layers', 'blocks_3' -> 'blocks'), or None (not a layer, or one below its stack's first: 'blocks_0')."""
    match = _LAYER_NAME.fullmatch(name)
    return match.group(1) if match and int(match.group(2)) >= STACKS[match.group(1)] else None


def _stacks(tree: Any) -> list[str]:
    """The stacked subtrees `tree` holds."""
    return [k for k in STACKS if isinstance(tree.get(k), dict)] if isinstance(tree, dict) else []


def is_stacked(tree: Any) -> bool:
    """Whether `tree` holds layers stacked under a `STACKS` subtree (`layers`, `blocks`)."""
    return bool(_stacks(tree))


def _stack_len(tree: dict, stack: str) -> int:
    """How many layers the stacked subtree `stack` of `tree` holds."""
    leaves = jax.tree.leaves(tree[stack])
    return int(jnp.shape(leaves[0])[0]) if leaves else 0


def _take(leaf: Any, i: int) -> Any:
    """Layer i of a stacked leaf (array or jax.ShapeDtypeStruct)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]


def _stack(leaves: list[Any]) -> Any:
    """Stacks per-layer leaves (arrays, numpy arrays or jax.ShapeDtypeStructs) along a new axis 0."""
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def layer_view(stacked: dict, i: int) -> dict:
    """Entry i of a stacked subtree: the same nesting, each leaf without its layer axis."""
    return jax.tree.map(lambda leaf: _take(leaf, i), stacked)


def num_layers(tree: dict) -> int:
    """The number of layers in a parameter (or adapter) tree: in the stacked layout the layers up to the
    stack's last (the unrolled ones below it included), else the unrolled layers present."""
    stacks = _stacks(tree)
    if stacks:
        return STACKS[stacks[0]] + _stack_len(tree, stacks[0])
    return sum(1 for k in tree if layer_index(k) is not None)


def unstack_layers(tree: dict) -> dict:
    """The unrolled layout of `tree`: a stacked subtree split into `layers_0` ... `layers_{L-1}` (RWKV-7:
    `blocks` into `blocks_1` ... `blocks_{L-1}`, beside `blocks_0`)."""
    stacks = _stacks(tree)
    if not stacks:
        return tree
    out = {k: v for k, v in tree.items() if k not in stacks}
    for s in stacks:
        first = STACKS[s]
        out.update({f"{s}_{first + i}": layer_view(tree[s], i) for i in range(_stack_len(tree, s))})
    return out


def _stackable(tree: dict) -> dict[str, list[int]]:
    """The unrolled layers of `tree` that the stacked layout stacks: {stack: sorted layer indices}."""
    found: dict[str, list[int]] = {}
    for k in tree:
        if (s := stack_of(k)) is not None:
            found.setdefault(s, []).append(layer_index(k))
    return {s: sorted(i) for s, i in found.items()}


def layers_differ(tree: dict, count: int | None = None) -> str | None:
    """Why the unrolled layers of `tree` cannot be stacked (a message), or None when they can.

    `count`: the model's number of layers (default: as many as are present)."""
    for s, found in _stackable(tree).items():
        first = STACKS[s]
        n = first + len(found) if count is None else count
        if found != list(range(first, n)):
            return f"only layers {found} of {n} are present" + (f" ({s}_0 ... {s}_{first - 1} stay unrolled)"
                                                               if first else "")
        structs = [jax.tree.map(lambda x: (jnp.shape(x), jnp.dtype(x.dtype)), tree[f"{s}_{i}"]) for i in found]
        for i, st in zip(found[1:], structs[1:]):
            if jax.tree.structure(st) != jax.tree.structure(structs[0]) or st != structs[0]:
                return f"layer {i} differs from layer {first}"
    return None


def stack_layers(tree: dict, count: int | None = None) -> dict:
    """The stacked layout of `tree`: `layers_0` ... `layers_{L-1}` joined into one `layers` subtree (RWKV-7:
    `blocks_1` ... `blocks_{L-1}` into `blocks`; `blocks_0` stays).

    Also converts adapters and workdirs written before the layers were stacked. Raises when the
    layers differ (per-layer targets): such a tree stays unrolled.
    """
    stackable = _stackable(tree)
    if is_stacked(tree) or not stackable:
        return tree
    why = layers_differ(tree, count)
    if why:
        raise ValueError(f"cannot stack the layers of this tree: {why} (per-layer targets keep the "
                         "unrolled layout)")
    out = {k: v for k, v in tree.items() if stack_of(k) is None}
    for s, found in stackable.items():
        out[s] = jax.tree.map(lambda *xs: _stack(list(xs)), *[tree[f"{s}_{i}"] for i in found])
    return out


def axes_like(param_axes: dict, params: dict) -> dict:
    """`param_axes` (a tuple of logical axis names per leaf, stacked layout) for `params` in the unrolled
    layout (per-layer targets): each unrolled layer gets its stack's axes without the leading 'layers'."""
    if is_stacked(params) or not _stacks(param_axes):
        return param_axes
    strip = lambda tree: jax.tree.map(lambda a: tuple(a[1:]), tree,  # noqa: E731
                                      is_leaf=lambda x: isinstance(x, tuple))
    out = {k: v for k, v in param_axes.items() if k not in STACKS}
    out.update({k: strip(param_axes[stack_of(k)]) for k in params if stack_of(k) in param_axes})
    return out


# ------------------------------------------------------------------------------------------ walks

def modules(params: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, dict]]:
    """Yields (path, kind, module_dict) for every 'linear', 'norm' and 'embedding' module.

    Stacked layers are yielded one layer at a time (path 'layers_<i>/...', leaves without the layer axis).
    """
    kernel, scale, table = params.get("kernel"), params.get("scale"), params.get("embedding")
    if kernel is not None and jnp.ndim(kernel) == 2:
        yield path, "linear", params
    elif scale is not None and jnp.ndim(scale) == 1:
        yield path, "norm", params
    elif table is not None and jnp.ndim(table) == 2:
        yield path, "embedding", params
    for name, sub in params.items():
        if name in STACKS and not path and isinstance(sub, dict):
            for i in range(_stack_len(params, name)):
                yield from modules(layer_view(sub, i), (f"{name}_{STACKS[name] + i}",))
        elif isinstance(sub, dict):
            yield from modules(sub, path + (name,))


def leaves(params: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yields (path, leaf) for every parameter leaf, the leaf's name last; stacked layers one layer at
    a time (path 'layers_<i>/...', leaves without the layer axis)."""
    for name, sub in params.items():
        if name in STACKS and not path and isinstance(sub, dict):
            for i in range(_stack_len(params, name)):
                yield from leaves(layer_view(sub, i), (f"{name}_{STACKS[name] + i}",))
        elif isinstance(sub, dict):
            yield from leaves(sub, path + (name,))
        else:
            yield path + (name,), sub


def _key_for(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)


def part_key(key: jax.Array, name: str) -> jax.Array:
    """The key the part `name` of a composite method initialises with (its modules' keys then derive
    from their paths inside the part, as for a model of its own)."""
    return _key_for(key, (name,))


def check_parts(method: PeftMethod, tree: Any, what: str = "parameters") -> tuple[str, ...] | None:
    """The parts of a composite method, each checked to be a top-level subtree of `tree` (the params or
    their logical axes); None for a plain method."""
    names = method.part_names()
    if names is None:
        return None
    tree = tree if isinstance(tree, dict) else {}
    missing = [name for name in names if not isinstance(tree.get(name), dict)]
    if missing:
        raise ValueError(f"PEFT method {method.name!r}: part(s) {missing} are not top-level subtrees of the "
                         f"model's {what}; its top-level keys are {sorted(tree)}")
    return names


def check_adapter_parts(method: PeftMethod, adapter: dict) -> tuple[str, ...] | None:
    """The parts of a composite method, checked to name every top-level entry of `adapter` (or of a
    tree shaped like it); None for a plain method."""
    names = method.part_names()
    if names is None:
        return None
    stray = [k for k in adapter if k not in names]
    if stray:
        raise ValueError(f"PEFT method {method.name!r}: the adapter holds top-level entries {stray} that are "
                         f"none of its parts {list(names)}")
    return names


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


def _with_writes(params: dict, writes: list[tuple[tuple[str, ...], str, Any]]) -> dict:
    """A copy of `params` with each (module path, leaf name, value) written, in the layout of `params`.

    Writes to unrolled paths 'layers_<i>/...' of stacked params are stacked when every layer gets one;
    otherwise the copy comes back unrolled.
    """
    out = _copy(params)
    stacks = _stacks(params)
    per_layer: dict[tuple[str, tuple[str, ...], str], dict[int, Any]] = {}
    for path, leaf_name, value in writes:
        s = stack_of(path[0]) if path else None
        if s not in stacks:
            _set(out, path, leaf_name, value)
        else:
            per_layer.setdefault((s, path[1:], leaf_name), {})[layer_index(path[0])] = value
    if all(len(values) == _stack_len(params, s) for (s, _, _), values in per_layer.items()):
        for (s, sub, leaf_name), values in per_layer.items():
            _set(out, (s,) + sub, leaf_name, _stack([values[i] for i in sorted(values)]))
        return out
    out = unstack_layers(out)
    for (s, sub, leaf_name), values in per_layer.items():
        for i, value in values.items():
            _set(out, (f"{s}_{i}",) + sub, leaf_name, value)
    return out


def init_adapter(method: PeftMethod, key: jax.Array, params: dict) -> tuple[dict, dict]:
    """Returns (params', adapter): the adapter tree for every targeted module, nested like `params`.

    params' equals params except where a residual method (PiSSA, MiLoRA) rewrote a base kernel.
    Each module's key is derived from its (unrolled) path, so the result does not depend on traversal
    order or on the layout. With stacked params the adapter is stacked too, unless it differs between
    layers: then params' and the adapter both come back unrolled. A composite method initialises each
    part on its own subtree with the key `part_key(key, part)`.
    """
    names = check_parts(method, params)
    if names is not None:
        new_params, adapter = dict(params), {}
        for name in names:
            try:
                new_params[name], part_adapter = init_adapter(method.part(name), part_key(key, name), params[name])
            except ValueError as e:
                raise ValueError(f"PEFT method {method.name!r}, part {name!r}: {e}") from e
            if part_adapter:
                adapter[name] = part_adapter
        return new_params, adapter
    writes, adapter = [], {}
    for path, kind, mod in modules(params):
        if not method.targets(path, kind):
            continue
        k = _key_for(key, path)
        if kind == "linear":
            kernel, a = method.init(k, mod["kernel"], mod.get("bias"), path=path)
            if kernel is not mod["kernel"]:
                writes.append((path, "kernel", kernel))
        elif kind == "norm":
            a = method.init_norm(k, mod["scale"], path=path)
        else:
            a = method.init_embedding(k, mod["embedding"], path=path)
        if a:
            _set(adapter, path, None, a)
    if "leaf" in method.kinds:  # the leaves no module kind above covered
        for path, value in leaves(params):
            module_path, leaf_name = path[:-1], path[-1]
            covered = _adapter_at(adapter, module_path) or {}
            if leaf_name in covered or not method.targets(module_path, "leaf"):
                continue
            a = method.init_leaf(_key_for(key, path), value, path=path)
            if a is not None:
                _set(adapter, module_path, leaf_name, a)
    if not adapter and method.name != "none":
        raise ValueError(f"PEFT method {method.name!r}: target_modules {method.target_modules} matched no "
                         "module of the model")
    if not is_stacked(params):
        return _with_writes(params, writes), adapter
    if layers_differ(adapter, num_layers(params)) is None:
        new_params = _with_writes(params, writes)
        if is_stacked(new_params):
            return new_params, stack_layers(adapter)
    return _with_writes(unstack_layers(params), writes), adapter


def _adapter_at(adapter: dict, path: tuple[str, ...]) -> dict | None:
    """The adapter leaves of the module at `path` (unrolled), from a stacked or an unrolled adapter."""
    node: Any = adapter
    s = stack_of(path[0]) if path else None
    stacked = s in _stacks(adapter)
    if stacked:
        i = layer_index(path[0]) - STACKS[s]
        node, path = adapter[s], path[1:]
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return None
    leaves = {k: v for k, v in node.items() if not isinstance(v, dict)}
    if stacked:
        leaves = {k: _take(v, i) for k, v in leaves.items()}
    return leaves or None


def merge(method: PeftMethod, params: dict, adapter: dict) -> dict:
    """Base params with every adapter folded in (for export as a plain HF checkpoint)."""
    if check_adapter_parts(method, adapter) is not None:
        check_parts(method, params)
        return {k: merge(method.part(k), v, adapter[k]) if k in adapter else v for k, v in params.items()}
    if method.replaces_base():  # the trained copies are the weights (the base may hold placeholders)
        merged = method.model_variables(params, adapter)["params"]
        return jax.tree.map(lambda m, p: m.astype(p.dtype), merged, params)
    writes = []
    for path, kind, mod in modules(params):
        a = _adapter_at(adapter, path)
        if not a:
            continue
        if kind == "linear":
            kernel, bias = method.merge(mod["kernel"], mod.get("bias"), a)
            writes.append((path, "kernel", kernel.astype(mod["kernel"].dtype)))
            if bias is not None:
                writes.append((path, "bias", bias.astype(mod["kernel"].dtype)))
        elif kind == "norm":
            writes.append((path, "scale", method.norm_scale(mod["scale"], a).astype(mod["scale"].dtype)))
        else:
            table = mod["embedding"]
            writes.append((path, "embedding", method.embedding_table(table, a).astype(table.dtype)))
    return _with_writes(params, writes)


def labels(method: PeftMethod, adapter: dict) -> dict:
    """Optimizer label per adapter leaf (same nesting as `adapter`); stacked leaves are labelled as
    one layer's (every layer gets the same labels)."""
    if check_adapter_parts(method, adapter) is not None:
        return {k: labels(method.part(k), v) for k, v in adapter.items()}

    def walk(node: dict, stacked: bool) -> dict:
        leaves = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if stacked:
            leaves = {k: jax.ShapeDtypeStruct(jnp.shape(v)[1:], v.dtype) for k, v in leaves.items()}
        out = dict(method.param_labels(leaves)) if leaves else {}
        out.update({k: walk(v, stacked) for k, v in node.items() if isinstance(v, dict)})
        return out
    stacks = _stacks(adapter)
    out = walk({k: v for k, v in adapter.items() if k not in stacks}, False)
    out.update({s: walk(adapter[s], True) for s in stacks})
    return out


def trainable_count(method: PeftMethod, adapter: dict) -> int:
    """Number of trained scalars: every adapter leaf except those labelled 'frozen'."""
    counts = jax.tree.map(lambda leaf, lab: 0 if lab == "frozen" else int(np.prod(jnp.shape(leaf))),
                          adapter, labels(method, adapter))
    return int(sum(jax.tree.leaves(counts)))


def map_modules(fn: Callable[[tuple[str, ...], str, dict, dict | None], Any], params: dict,
                adapter: dict) -> list[Any]:
    """Calls fn(path, kind, module_params, module_adapter) for every module (layer by layer when
    stacked, with unrolled paths); returns the results."""
    return [fn(path, kind, mod, _adapter_at(adapter, path)) for path, kind, mod in modules(params)]


def adapter_axes(method: PeftMethod, param_axes: dict, adapter: dict) -> dict:
    """Logical axis names for every adapter leaf (same nesting as `adapter`), from the axes of the
    weight each module adapts (`param_axes`: the params tree with a tuple of axis names per leaf).
    Stacked layers keep their leading 'layers' axis. Model-level leaves outside any module (VeRA's
    shared projections) get no names (replicated). A method whose adapter replaces the base weights
    (full fine-tuning) holds copies, which get the axes of the leaves they copy."""
    if check_adapter_parts(method, adapter) is not None:
        check_parts(method, param_axes, "logical axes")
        return {k: adapter_axes(method.part(k), param_axes[k], v) for k, v in adapter.items()}

    def walk(axes_node: Any, adapter_node: dict, stacked: bool) -> dict:
        leaves = {k: v for k, v in adapter_node.items() if not isinstance(v, dict)}
        node: dict = {}
        own = axes_node if isinstance(axes_node, dict) else {}
        if leaves and method.replaces_base() and all(isinstance(own.get(k), tuple) for k in leaves):
            node.update({k: tuple(own[k]) for k in leaves})
        elif leaves:
            kind_leaf = next((own[name] for name in ("kernel", "scale", "embedding") if name in own), None)
            if kind_leaf is None:
                node.update({k: (None,) * jnp.ndim(v) for k, v in leaves.items()})
            elif stacked:  # one layer's axes, then the layer axis in front again
                one = {k: jax.ShapeDtypeStruct(jnp.shape(v)[1:], v.dtype) for k, v in leaves.items()}
                node.update({k: (kind_leaf[0],) + tuple(a) for k, a in
                             method.adapter_axes(tuple(kind_leaf[1:]), one).items()})
            else:
                node.update(method.adapter_axes(tuple(kind_leaf), leaves))
        for k, v in adapter_node.items():
            if isinstance(v, dict):
                sub = axes_node.get(k, {}) if isinstance(axes_node, dict) else {}
                node[k] = walk(sub, v, stacked or (k in STACKS and axes_node is param_axes))
        return node
    return walk(param_axes, adapter, False)


def drop_replaced(method: PeftMethod, params: dict, adapter: dict) -> dict:
    """`params` without the base weights that `method` replaces by full trainable copies in `adapter`
    (full fine-tuning): each becomes a scalar placeholder, so the run holds one copy of the model.
    Only valid where nothing needs the base weights themselves (no reference policy). A composite
    method drops them in the parts whose method replaces them."""
    if check_adapter_parts(method, adapter) is not None:
        check_parts(method, params)
        return {k: drop_replaced(method.part(k), v, adapter[k]) if k in adapter else v for k, v in params.items()}
    if not method.replaces_base():
        return params

    def walk(p: Any, a: Any) -> Any:
        if not isinstance(a, dict):
            return jnp.zeros((), p.dtype)
        return {k: walk(v, a[k]) if k in a else v for k, v in p.items()}
    return walk(params, adapter)
