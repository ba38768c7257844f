"""Full fine-tuning as a PEFT method: the adapter is a trainable copy of every weight it targets.

Linear layers train a copy of kernel (and bias), norms a copy of their gain, the token embedding a
copy of its table, and every other parameter leaf (norm biases, RWKV-7's token-shift mixes, decay and
value vectors: kind 'leaf') a copy of itself, so every parameter of either family trains. The base
stays in `params` and serves as the reference policy. There is no HF PEFT format: the merged export
(the trained copies swapped in) is the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from jaxrl_peft.peft.base import Adapter, Array, PeftMethod, linear
from jaxrl_peft.peft.registry import register


@register
@dataclasses.dataclass(frozen=True)
class Full(PeftMethod):
    """Trains copies of all targeted linear, norm, embedding and other weights (default: all of them),
    kept in `dtype` (fp32 master weights by default; None keeps the base dtype)."""

    name: ClassVar[str] = "full"
    kinds: ClassVar[tuple[str, ...]] = ("linear", "norm", "embedding", "leaf")
    target_modules: tuple[str, ...] = ("*",)
    dtype: str | None = "float32"

    def _copy(self, a: Array) -> Array:
        return jnp.array(a, dtype=self.dtype or a.dtype, copy=True)

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        del key, path
        adapter = {"kernel": self._copy(kernel)}
        if bias is not None:
            adapter["bias"] = self._copy(bias)
        return kernel, adapter

    def init_norm(self, key: Array, scale: Array, *, path: tuple[str, ...] = ()) -> Adapter:
        del key, path
        return {"scale": self._copy(scale)}

    def init_embedding(self, key: Array, table: Array, *, path: tuple[str, ...] = ()) -> Adapter:
        del key, path
        return {"embedding": self._copy(table)}

    def init_leaf(self, key: Array, value: Array, *, path: tuple[str, ...] = ()) -> Array:
        """A trainable copy of a parameter leaf that is no kernel, gain or table (kind 'leaf')."""
        del key, path
        return self._copy(value)

    def embedding_table(self, table: Array, adapter: Adapter) -> Array:
        return adapter["embedding"].astype(table.dtype)

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        del kernel
        if bias is not None and "bias" not in adapter:
            raise ValueError("full: the layer has a bias but its adapter copy does not")
        b = adapter.get("bias")
        return linear(x, adapter["kernel"].astype(x.dtype), None if b is None else b.astype(x.dtype))

    def norm_scale(self, scale: Array, adapter: Adapter) -> Array:
        return adapter["scale"].astype(scale.dtype)

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        del kernel
        return adapter["kernel"], adapter.get("bias", bias)

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        if "scale" in adapter:  # a norm: its gain and (kind 'leaf') its bias
            return {k: tuple(kernel_axes[-1:]) or ("norm",) for k in adapter}
        axes = {"kernel": tuple(kernel_axes), "embedding": tuple(kernel_axes), "bias": tuple(kernel_axes[1:])}
        return {k: axes[k] for k in adapter}

    def replaces_base(self) -> bool:
        return True

    def model_variables(self, params: Any, adapter: Any) -> dict[str, Any]:
        """The trained copies stand in the base tree's place: the model runs on them directly, so the
        base copies they replace may be dropped (`registry.drop_replaced`) when no reference needs them."""
        return {"params": overlay(params, adapter)}


def overlay(base: Any, top: Any) -> Any:
    """`base` with every leaf that `top` holds at the same path replaced by `top`'s."""
    if not isinstance(top, dict):
        return top
    out = dict(base)
    for k, v in top.items():
        if k not in out:
            raise ValueError(f"full: adapter entry {k!r} has no counterpart in the base parameters")
        out[k] = overlay(out[k], v)
    return out
