"""A composite method: its own PEFT method for each top-level part of one model's parameter tree.

ModRWKV's stage 2 trains its connector fully and its language model with LoRA; the config names one
method per top-level key of the params, and every part it does not name stays frozen:

    peft.name = 'parts'
    peft.hparams.parts = {'adapter': {'name': 'full', 'hparams': {}},
                          'llm': {'name': 'lora', 'hparams': {'r': 32, 'alpha': 64}}}

How each hook reaches the parts:
- Modules: a model builds each top-level submodule with `method.part(name)` (the identity for parts
  not named), so the per-module hooks (apply, norm_scale, embedding_table) are the part's own method's
  and need no path. The composite itself refuses them with a clear error.
- Whole-tree walks (`registry.init_adapter`, `labels`, `trainable_count`, `adapter_axes`, `merge`,
  `drop_replaced`, and the optimizer's `precondition`) run each part's method on its subtree as on a
  model of its own: target patterns, module paths and the stacked-layer layout are relative to the
  part, and a part initialises with `registry.part_key(key, part)` (a fold-in of the part's name), its
  modules' keys derived from their paths inside the part. So a part's adapter is exactly what its method
  gives on that subtree alone with that key; it differs from a whole-model LoRA whose target patterns
  pick the same modules, whose keys derive from the full paths.
- Tree-level hooks: `model_variables` combines the parts' variables into one dict (a full part's
  trained copies overlaid on its params, a LoRA part's entries in the `adapter` collection under its
  key); `regularizer` sums the parts'; `init_state` and `on_step` keep one state per part that has
  one (None when no part has any).
- `residual` is True when any part's method rewrites its base weights (PiSSA, MiLoRA): switching the
  whole adapter off then does not give the original model, so a KL reference keeps the initial adapter.
  `replaces_base()` is True only when every part's method replaces its base weights; the registry drops
  or merges the replaced weights part by part either way.
- There is no Hugging Face PEFT format for a mixture (`hf_config` is None, so `hf_peft.save_adapter`
  refuses it); export merged weights (`registry.merge`) instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import IDENTITY, Adapter, Array, PeftMethod


def _plain(value: Any) -> Any:
    """A config value as plain Python: ConfigDicts and mappings as dicts, lists as tuples (hashable)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _sub_method(part: str, spec: Any) -> PeftMethod:
    """The method of one part from a built method or a config block {'name': ..., 'hparams': {...}}."""
    where = f"PEFT method 'parts', part {part!r}"
    if isinstance(spec, PeftMethod):
        method = spec
    else:
        spec = _plain(spec)
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"{where}: expected a block {{'name': <method>, 'hparams': {{...}}}}, got {spec!r}")
        stray = sorted(set(spec) - {"name", "hparams"})
        if stray:
            raise ValueError(f"{where}: unknown field(s) {stray}; a part has 'name' and 'hparams'")
        if spec["name"] == Parts.name:
            raise ValueError(f"{where}: a part cannot itself be 'parts' (parts are top-level keys only)")
        hparams = spec.get("hparams") or {}
        if not isinstance(hparams, dict):
            raise ValueError(f"{where}: hparams must be a mapping, got {hparams!r}")
        try:
            method = registry.get(spec["name"], **hparams)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    if method.part_names() is not None:
        raise ValueError(f"{where}: a part cannot itself be a composite method ({method.name!r})")
    return method


@registry.register
@dataclasses.dataclass(frozen=True)
class Parts(PeftMethod):
    """One method per named top-level part of the params (`parts`: {part: method or config block});
    the parts not named are frozen. Hashable: the parts are kept as sorted (name, method) pairs."""

    name: ClassVar[str] = "parts"
    target_modules: tuple[str, ...] = ()
    parts: Any = ()

    def __post_init__(self) -> None:
        if self.target_modules:
            raise ValueError("PEFT method 'parts': target_modules belong in each part's hparams, got "
                             f"{self.target_modules!r}")
        spec = self.parts
        if hasattr(spec, "to_dict"):
            spec = spec.to_dict()
        items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
        if not items:
            raise ValueError("PEFT method 'parts': name at least one part, e.g. parts={'llm': {'name': 'lora', "
                             "'hparams': {...}}}")
        pairs = []
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"PEFT method 'parts': parts must map part names to methods, got {spec!r}")
            part, method = item
            if not isinstance(part, str) or not part or "/" in part:
                raise ValueError(f"PEFT method 'parts': part names are top-level keys of the params, got {part!r}")
            if any(part == seen for seen, _ in pairs):
                raise ValueError(f"PEFT method 'parts': part {part!r} is named twice")
            pairs.append((part, _sub_method(part, method)))
        object.__setattr__(self, "parts", tuple(sorted(pairs, key=lambda pair: pair[0])))

    # --- the parts --------------------------------------------------------------------------
    def part(self, name: str) -> PeftMethod:
        """The method of the part `name`; the identity (frozen, no adapter) for parts not named."""
        return dict(self.parts).get(name, IDENTITY)

    def part_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    @property
    def residual(self) -> bool:  # type: ignore[override]
        """Whether any part's method rewrites its base weights (PiSSA, MiLoRA)."""
        return any(method.residual for _, method in self.parts)

    def replaces_base(self) -> bool:
        return all(method.replaces_base() for _, method in self.parts)

    def prepare(self, params: dict) -> "Parts":
        """Each part's method fitted to its own subtree (VeRA sizes its projections there)."""
        registry.check_parts(self, params)
        return dataclasses.replace(self, parts=tuple((name, method.prepare(params[name]))
                                                     for name, method in self.parts))

    def targets(self, path: tuple[str, ...], kind: str) -> bool:
        """Whether the part `path[0]`'s method adapts the module at the rest of `path` (relative to the part)."""
        return bool(path) and self.part(path[0]).targets(path[1:], kind)

    # --- tree-level hooks: per part ---------------------------------------------------------
    def _adapter_parts(self, adapter_tree: Any) -> list[tuple[str, PeftMethod, Any]]:
        """(part, method, subtree) for each part an adapter-shaped tree holds (named parts only)."""
        registry.check_adapter_parts(self, adapter_tree)
        return [(k, self.part(k), v) for k, v in adapter_tree.items()]

    def model_variables(self, params: Any, adapter: Any) -> dict[str, Any]:
        """One variables dict for the whole model: each part's `params` in its place (a full part's
        trained copies overlaid), each other collection of a part (its `adapter`) under the part's key."""
        out: dict[str, Any] = {"params": dict(params), "adapter": {}}
        for name, method, sub in self._adapter_parts(adapter):
            for collection, tree in method.model_variables(params[name], sub).items():
                if collection == "params":
                    out["params"][name] = tree
                elif tree:
                    out.setdefault(collection, {})[name] = tree
        return out

    def regularizer(self, adapter_tree: Any) -> Array:
        total = jnp.zeros((), jnp.float32)
        for _, method, sub in self._adapter_parts(adapter_tree):
            total = total + method.regularizer(sub)
        return total

    def init_state(self, adapter_tree: Any) -> Any:
        states = {name: method.init_state(sub) for name, method, sub in self._adapter_parts(adapter_tree)}
        states = {name: s for name, s in states.items() if s is not None}
        return states or None

    def on_step(self, step: Array, grads: Any, adapter_tree: Any, state: Any) -> tuple[Any, Any]:
        adapter_out, state_out = dict(adapter_tree), {}
        for name, method, sub in self._adapter_parts(adapter_tree):
            own = (state or {}).get(name)
            adapter_out[name], new = method.on_step(step, grads[name], sub, own)
            if new is not None:
                state_out[name] = new
        return adapter_out, state_out or None

    def hf_config(self) -> dict | None:
        """None: HF PEFT has no format for a mixture of methods (export merged weights instead)."""
        return None

    # --- per-module hooks: only a part's method has them --------------------------------------
    def _per_module(self, hook: str) -> ValueError:
        return ValueError(f"PEFT method 'parts' got one module's weights ({hook}); build each top-level "
                          "submodule with its part's method, `method.part(name)`, and walk whole trees "
                          "through jaxrl_peft.peft.registry, which dispatches per part")

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        raise self._per_module("init")

    def init_norm(self, key: Array, scale: Array, *, path: tuple[str, ...] = ()) -> Adapter:
        raise self._per_module("init_norm")

    def init_embedding(self, key: Array, table: Array, *, path: tuple[str, ...] = ()) -> Adapter:
        raise self._per_module("init_embedding")

    def init_leaf(self, key: Array, value: Array, *, path: tuple[str, ...] = ()) -> Any:
        raise self._per_module("init_leaf")

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        raise self._per_module("apply")

    def norm_scale(self, scale: Array, adapter: Adapter) -> Array:
        raise self._per_module("norm_scale")

    def embedding_table(self, table: Array, adapter: Adapter) -> Array:
        raise self._per_module("embedding_table")

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        raise self._per_module("merge")

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        raise self._per_module("adapter_axes")

    def param_labels(self, adapter: Adapter) -> Any:
        raise self._per_module("param_labels")

    def precondition(self, grads: Adapter, adapter: Adapter) -> Adapter:
        raise self._per_module("precondition")

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        raise self._per_module("hf_tensors")

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        raise self._per_module("from_hf_tensors")
