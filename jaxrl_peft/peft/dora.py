"""DoRA (weight-decomposed LoRA) as HF PEFT's `DoraLinearLayer` computes it.

Adapter per linear: lora_a [in, r], lora_b [r, out], magnitude [out] (initialised to the norm of each
output unit of W0 + s B A, i.e. a column norm of our [in, out] kernel). Forward, with the norm n
computed from the detached LoRA product and then detached itself (DoRA paper section 4.3):
  c = m / n;  y = (x W0 + b) + (c - 1) * (x W0) + c * s * (x A) B   (the bias is not rescaled).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array, linear
from jaxrl_peft.peft.lora import LoRA, _lora_ab, dropout, to_np
from jaxrl_peft.peft.registry import register


@register
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA: LoRA direction plus a trainable per-output-unit magnitude."""

    name: ClassVar[str] = "dora"

    def weight_norm(self, kernel: Array, adapter: Adapter) -> Array:
        """||W0 + s B A|| per output unit [out], fp32, with no gradient (PEFT detaches it)."""
        w = kernel.astype(jnp.float32) + jax.lax.stop_gradient(self.delta(adapter))
        return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(w), axis=0)))

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        kernel, adapter = super().init(key, kernel, bias, path=path)
        adapter["magnitude"] = self.weight_norm(kernel, adapter).astype(jnp.dtype(self.adapter_dtype))
        return kernel, adapter

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        c = (adapter["magnitude"].astype(jnp.float32) / self.weight_norm(kernel, adapter)).astype(x.dtype)
        base = linear(x, kernel, None)  # [..., out]
        xd = dropout(x, self.dropout)
        base_d = base if xd is x else linear(xd, kernel, None)  # PEFT recomputes W0 x on the dropped x
        y = base + (c - 1) * base_d + c * self.lora_out(xd, adapter)
        return y if bias is None else y + bias

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        w = kernel.astype(jnp.float32) + self.delta(adapter)
        c = adapter["magnitude"].astype(jnp.float32) / jnp.sqrt(jnp.sum(jnp.square(w), axis=0))
        return (w * c[None, :]).astype(kernel.dtype), bias

    def hf_config(self) -> dict | None:
        return {**super().hf_config(), "use_dora": True}

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        return {**super().hf_tensors(adapter), "lora_magnitude_vector": to_np(adapter["magnitude"])}

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        a, b = _lora_ab(tensors, kernel, self)
        m = np.asarray(tensors["lora_magnitude_vector"])
        if m.shape != (kernel.shape[1],):
            raise ValueError(f"lora_magnitude_vector has shape {m.shape}, expected ({kernel.shape[1]},)")
        return {"lora_a": a, "lora_b": b, "magnitude": jnp.asarray(m, jnp.dtype(self.adapter_dtype))}
