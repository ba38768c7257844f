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
    # Which leaf kinds the method adapts: 'linear' (modules with a 2-D kernel) and/or 'norm'.
    kinds: ClassVar[tuple[str, ...]] = ("linear",)
    target_modules: tuple[str, ...] = ALL_LINEAR

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

    def param_labels(self, adapter: Adapter) -> Any:
        """Optimizer group label per adapter leaf, for optax.multi_transform."""
        return jax.tree.map(lambda _: "default", adapter)


IDENTITY = PeftMethod(target_modules=())
