"""The interface every PEFT method implements, and the identity method.

A method is a frozen (hashable) dataclass, so it can sit on a linen module as a static attribute.
The frozen base weights live in the `params` collection; everything the method trains or keeps lives
in the `adapter` collection, nested exactly like the module that owns it (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

Array = jax.Array
Adapter = dict[str, Any]

# The seven linear projections of a decoder block (HF module names).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear(x: Array, kernel: Array, bias: Array | None) -> Array:
    """y = x @ kernel + bias, contracting the last axis of x with the first of kernel."""
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


@dataclasses.dataclass(frozen=True)
class PeftMethod:
    """Base class; on its own it is the identity (no adapter, nothing trainable).

    `target_modules` are glob patterns matched against the module path joined with '/', e.g.
    'layers_3/self_attn/q_proj'; a bare name such as 'q_proj' matches that module in every block.
    """

    name: ClassVar[str] = "none"
    # Which leaf kinds the method adapts: 'linear' (modules with a 2-D kernel), 'norm', 'embedding', and
    # 'leaf' (any other parameter leaf: RWKV-7's mixing vectors, norm biases; full fine-tuning).
    kinds: ClassVar[tuple[str, ...]] = ("linear",)
    # True when init rewrites the base weights (PiSSA, MiLoRA): switching the adapter off then does not
    # give the original model, so the reference policy keeps the initial adapter instead.
    residual: ClassVar[bool] = False
    target_modules: tuple[str, ...] = ALL_LINEAR

    def part(self, name: str) -> "PeftMethod":
        """The method of the top-level part `name` of the parameter tree: a model builds that submodule
        with it. A plain method covers every part itself; a composite (`parts`) gives each its own."""
        del name
        return self

    def part_names(self) -> tuple[str, ...] | None:
        """The top-level parts a composite method (`parts`) gives methods of their own, so that whole-tree
        walks (registry, optimizer) run per part; None for a plain method, which sees the whole tree."""
        return None

    def prepare(self, params: dict) -> "PeftMethod":
        """This method fitted to a model's parameter tree (VeRA sizes its shared projections here)."""
        del params
        return self

    def targets(self, path: tuple[str, ...], kind: str) -> bool:
        """Whether the module at `path` (a tuple of module names) of this kind is adapted."""
        if kind not in self.kinds:
            return False
        joined = "/".join(path)
        return any(
            fnmatch.fnmatchcase(path[-1], pat) or fnmatch.fnmatchcase(joined, pat) or
            fnmatch.fnmatchcase(joined, "*/" + pat)
            for pat in self.target_modules)

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        """Returns (kernel', adapter). kernel' differs from kernel only for residual methods."""
        del key, bias, path
        return kernel, {}

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        """y = f(x; W, b, adapter). x and kernel already carry the compute dtype."""
        del adapter
        return linear(x, kernel, bias)

    def norm_scale(self, scale: Array, adapter: Adapter) -> Array:
        """The gain a norm layer uses given its adapter (LayerNorm tuning overrides this)."""
        del adapter
        return scale

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        """Folds the adapter into the base weights: returns (W_merged, b_merged)."""
        del adapter
        return kernel, bias

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        """Logical axis names for each adapter leaf (same tree as `adapter`), for sharding."""
        del kernel_axes
        return jax.tree.map(lambda a: (None,) * jnp.ndim(a), adapter)

    def init_embedding(self, key: Array, table: Array, *, path: tuple[str, ...] = ()) -> Adapter:
        """Adapter of a token embedding [vocab, embed] (methods with 'embedding' in `kinds`)."""
        del key, table, path
        return {}

    def embedding_table(self, table: Array, adapter: Adapter) -> Array:
        """The embedding table a model uses given its adapter (full fine-tuning overrides this)."""
        del adapter
        return table

    def init_leaf(self, key: Array, value: Array, *, path: tuple[str, ...] = ()) -> Any:
        """Adapter of a parameter leaf no other kind covers (methods with 'leaf' in `kinds`)."""
        del key, value, path
        return None

    def init_norm(self, key: Array, scale: Array, *, path: tuple[str, ...] = ()) -> Adapter:
        """Adapter of a norm layer (methods with 'norm' in `kinds`)."""
        del key, scale, path
        return {}

    def param_labels(self, adapter: Adapter) -> Any:
        """Optimizer group label per adapter leaf, for optax.multi_transform.

        'default' trains at the base learning rate, 'frozen' is kept fixed (no optimizer state);
        methods may add groups (e.g. LoRA+'s 'lora_b') that the optimizer builder knows.
        """
        return jax.tree.map(lambda _: "default", adapter)

    def regularizer(self, adapter_tree: Any) -> Array:
        """A term added to the training loss over the whole adapter tree (AdaLoRA's orthogonality)."""
        del adapter_tree
        return jnp.zeros((), jnp.float32)

    def init_state(self, adapter_tree: Any) -> Any:
        """State of the per-step hook (e.g. AdaLoRA importance EMAs); None when there is no hook."""
        del adapter_tree
        return None

    def hf_config(self) -> dict | None:
        """This method's HF PEFT `adapter_config.json` fields, or None when HF PEFT has no format for it."""
        return None

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        """One module's adapter as HF PEFT tensors, keyed by the suffix after the module name
        (e.g. {'lora_A.weight': A[r, in]}); torch layout."""
        raise NotImplementedError(f"{self.name}: no Hugging Face PEFT export")

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        """Inverse of `hf_tensors` for one module (kernel: that module's base kernel [in, out])."""
        raise NotImplementedError(f"{self.name}: no Hugging Face PEFT import")

    def on_step(self, step: Array, grads: Any, adapter_tree: Any, state: Any) -> tuple[Any, Any]:
        """Runs after each optimizer update, inside the jitted step: returns (adapter_tree, state).
        AdaLoRA prunes rank here. `step` is the 0-based index of the update just applied."""
        del step, grads
        return adapter_tree, state

    def precondition(self, grads: Adapter, adapter: Adapter) -> Adapter:
        """One module's gradients before the optimizer step (LoRA-FA projects B's gradient)."""
        del adapter
        return grads

    def hf_shared_tensors(self, adapter_tree: Any) -> dict[str, Any]:
        """Model-level tensors of the HF PEFT format that belong to no module (VeRA's projections)."""
        del adapter_tree
        return {}

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "PeftMethod":
        """The method an HF PEFT adapter_config.json describes (kwargs: fields already decided)."""
        raise NotImplementedError(f"{cls.name}: no Hugging Face PEFT format")

    def replaces_base(self) -> bool:
        """True when the adapter holds a full trainable copy of every base weight it targets (full
        fine-tuning): the base copies can then be dropped when no reference policy needs them."""
        return False

    def model_variables(self, params: Any, adapter: Any) -> dict[str, Any]:
        """The variables the model is applied with: the frozen base and the adapter collection."""
        return {"params": params, "adapter": adapter}


IDENTITY = PeftMethod(target_modules=())
