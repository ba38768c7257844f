"""Layers shared by both model families: the one `Linear` every projection goes through, RMSNorm.

Both ask the configured PEFT method how to compute their output when the `adapter` collection holds
an entry for them (DESIGN.md: models are functions of parameter trees).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrl_peft.peft.base import PeftMethod, linear

Dtype = Any
Initializer = Callable[..., jax.Array]


def _adapter_of(module: nn.Module) -> dict | None:
    """The adapter entries stored for this module, or None."""
    adapter = module.variables.get("adapter")
    return dict(adapter) if adapter else None


def _require_method(module: nn.Module, method: PeftMethod | None) -> PeftMethod:
    if method is None:
        raise ValueError(f"module {'/'.join(module.scope.path)} received adapter weights but the model "
                         "was built without a PEFT method (pass peft=... to the model)")
    return method


def adapted_gain(module: nn.Module, scale: jax.Array) -> jax.Array:
    """A norm layer's gain, as the module's PEFT method sets it when it holds an adapter."""
    adapter = _adapter_of(module)
    return _require_method(module, module.peft).norm_scale(scale, adapter) if adapter else scale


class Linear(nn.Module):
    """y = x W + b with W of shape [in, features]; a PEFT method may replace the computation."""

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None
    kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), self.param_dtype)
            bias = bias.astype(self.dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        adapter = _adapter_of(self)
        if adapter:
            return _require_method(self, self.peft).apply(x, kernel, bias, adapter)
        return linear(x, kernel, bias)


class RMSNorm(nn.Module):
    """RMSNorm as Hugging Face computes it: normalise in fp32, cast back, then scale."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        scale = adapted_gain(self, scale)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm computed in fp32 (RWKV); its gain goes through the PEFT method like RMSNorm's."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (d,), self.param_dtype)
        scale = adapted_gain(self, scale)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding [vocab, features]; a PEFT method may supply the table (full fine-tuning)."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None
    embedding_init: Initializer = nn.initializers.normal(0.02)

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype)

    def table(self) -> jax.Array:
        adapter = _adapter_of(self)
        table = self.embedding
        if adapter:
            table = _require_method(self, self.peft).embedding_table(table, adapter)
        return table.astype(self.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.table(), tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the (tied) table: x [..., features] -> [..., vocab]."""
        return x.astype(self.dtype) @ self.table().T
