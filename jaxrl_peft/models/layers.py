"""Layers shared by both model families: the one `Linear` every projection goes through (a `Conv1D` is
a `Linear` over unfolded windows), RMSNorm, LayerNorm, Embed.

Both ask the configured PEFT method how to compute their output when the `adapter` collection holds
an entry for them (DESIGN.md: models are functions of parameter trees).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import PeftMethod, linear

Dtype = Any
Array = jax.Array
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


def conv_windows(x: jax.Array, kernel_size: int, stride: int, padding: int = 0) -> jax.Array:
    """Unfolds [B, T, C] into the windows a Conv1d sees: [B, T', kernel_size * C], window-major."""
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (0, 0)))
    out_len = (x.shape[1] - kernel_size) // stride + 1
    if out_len < 1:
        raise ValueError(f"conv_windows: {x.shape[1]} positions (padding included) are fewer than "
                         f"kernel_size {kernel_size}")
    index = np.arange(out_len)[:, None] * stride + np.arange(kernel_size)[None, :]  # [T', kernel]
    windows = x[:, index]  # [B, T', kernel, C]
    return windows.reshape(x.shape[0], out_len, kernel_size * x.shape[2])


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """A torch Conv1d weight [out, in, kernel] as the Linear kernel [kernel * in, out] of `conv_windows`."""
    out_ch, in_ch, width = weight.shape
    return np.ascontiguousarray(weight.transpose(2, 1, 0)).reshape(width * in_ch, out_ch)


def conv_weight(kernel: np.ndarray, kernel_size: int) -> np.ndarray:
    """Inverse of `conv_kernel`: a Linear kernel [kernel * in, out] as a torch Conv1d weight [out, in, kernel]."""
    rows, out_ch = kernel.shape
    if rows % kernel_size:
        raise ValueError(f"conv_weight: kernel rows {rows} are not a multiple of kernel_size {kernel_size}")
    return np.ascontiguousarray(kernel.reshape(kernel_size, rows // kernel_size, out_ch).transpose(2, 1, 0))


class Conv1D(Linear):
    """A 1-D convolution over [B, T, C] as a `Linear` over its unfolded windows, so PEFT methods reach it.

    Same parameters as `Linear` (kernel [kernel_size * C, features], window-major; `conv_kernel` converts
    a torch Conv1d weight); output [B, (T + 2 * padding - kernel_size) // stride + 1, features].
    """

    kernel_size: int = 3
    stride: int = 1
    padding: int = 0

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(conv_windows(x, self.kernel_size, self.stride, self.padding))


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


def chunked_token_logprobs(hidden: Array, targets: Array, head: Callable[[Array], Array], chunk: int = 512,
                           temperature: float = 1.0, with_entropy: bool = False) -> tuple[Array, Array | None]:
    """Token log-probs (and entropies) [B, N] of `targets` [B, N] from final hidden states [B, N, D],
    `head` [B, C, D] -> logits [B, C, V] run `chunk` positions at a time under remat, so [B, N, V] logits
    are never held in memory (forward or backward)."""
    b, n, d = hidden.shape
    chunk = min(chunk, n)
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, t):  # [B, C, D], [B, C]
        logits = head(h).astype(jnp.float32) / temperature  # [B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1) if with_entropy else None
        return lp, ent

    lp, ent = jax.lax.map(lambda xs: one(*xs), (hidden, targets))  # [n_chunks, B, C]
    lp = lp.swapaxes(0, 1).reshape(b, -1)[:, :n]
    ent = ent.swapaxes(0, 1).reshape(b, -1)[:, :n] if with_entropy else None
    return lp, ent
