"""MiSS (matrix shard sharing, the successor of Bone), as Hugging Face PEFT `tuners/miss` computes it.

Variants (PEFT's `init_weights`):
  'balance' (PEFT True): one shard D [r, out], zeros; y = W0 x + b + (sum_j x_j) D with x padded to a
      multiple of r and cut into r-wide chunks x_j, i.e. every r-column block of W gets the same D^T.
  'mini': D [r, mini_r], zeros, tiled out/mini_r times along the output dimension to form [r, out].
  'bat' (block affine): D [out/r, r, r], zeros; every r x r block W_ij of the torch weight [out, in]
      (j over output blocks) becomes W_ij + W_ij D_j + D_j; the forward materialises the weight.
No scaling factor and no dropout (the study passes only r).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array, PeftMethod, linear
from jaxrl_peft.peft.registry import register

VARIANTS = ("balance", "mini", "bat")


@register
@dataclasses.dataclass(frozen=True)
class Miss(PeftMethod):
    """MiSS with rank `r` (chunk width along the input dimension); see the module docstring."""

    name: ClassVar[str] = "miss"
    r: int = 64
    variant: str = "balance"
    mini_r: int = 1

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"miss: variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.r <= 0:
            raise ValueError(f"miss: r must be a positive integer, got {self.r}")
        if self.variant == "mini" and self.mini_r <= 0:
            raise ValueError(f"miss: mini_r must be a positive integer, got {self.mini_r}")

    def _shape(self, n_in: int, n_out: int, path: tuple[str, ...]) -> tuple[int, ...]:
        where = "/".join(path) or "module"
        if self.r > n_in:
            raise ValueError(f"miss: r={self.r} exceeds the input size {n_in} of {where}")
        if self.variant == "bat":
            if n_in % self.r or n_out % self.r:
                raise ValueError(f"miss (bat): r={self.r} must divide both dimensions of {where} "
                                 f"(in={n_in}, out={n_out}) to cut it into r x r blocks")
            return (n_out // self.r, self.r, self.r)
        if self.variant == "mini":
            if n_out % self.mini_r:
                raise ValueError(f"miss (mini): mini_r={self.mini_r} must divide the output size {n_out} "
                                 f"of {where}")
            return (self.r, self.mini_r)
        return (self.r, n_out)

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        del key, bias
        return kernel, {"D": jnp.zeros(self._shape(*kernel.shape, path), jnp.float32)}

    def _shard(self, d: Array, n_out: int) -> Array:
        """The balance/mini shard as [r, out]."""
        return jnp.tile(d, (1, n_out // self.mini_r)) if self.variant == "mini" else d

    def _bat_kernel(self, kernel: Array, d: Array) -> Array:
        """The materialised bat kernel [in, out] = (W + blockwise(W_ij D_j + D_j))^T."""
        n_in, n_out = kernel.shape
        r = self.r
        k4 = kernel.reshape(n_in // r, r, n_out // r, r)  # [i, a, j, b] = W[j*r + b, i*r + a]
        # new W_ij[b, c] = W_ij[b, c] + sum_a W_ij[b, a] D_j[a, c] + D_j[b, c]; stored transposed as [i, c, j, b]
        delta = jnp.einsum("iajb,jac->icjb", k4, d) + jnp.transpose(d, (2, 0, 1))[None]
        return kernel + delta.reshape(n_in, n_out)

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        d = adapter["D"].astype(x.dtype)
        if self.variant == "bat":
            return linear(x, self._bat_kernel(kernel, d), bias)
        n_in, n_out = kernel.shape
        shard = self._shard(d, n_out)  # [r, out]
        pad = (-n_in) % self.r
        x_p = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
        chunks = x_p.reshape(*x.shape[:-1], (n_in + pad) // self.r, self.r)  # [..., in/r, r]
        return linear(x, kernel, bias) + linear(jnp.sum(chunks, axis=-2), shard, None)

    def delta(self, kernel: Array, adapter: Adapter) -> Array:
        """The weight update in kernel layout [in, out]."""
        d = adapter["D"].astype(kernel.dtype)
        if self.variant == "bat":
            return self._bat_kernel(kernel, d) - kernel
        n_in, n_out = kernel.shape
        shard = self._shard(d, n_out)
        return jnp.tile(shard, (-(-n_in // self.r), 1))[:n_in]

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        k32 = kernel.astype(jnp.float32)
        return k32 + self.delta(k32, adapter), bias

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        if self.variant == "balance":
            return {"D": ("rank", kernel_axes[1])}
        return {"D": (None,) * jnp.ndim(adapter["D"])}

    def hf_config(self) -> dict | None:
        init = {"balance": True, "mini": "mini", "bat": "bat"}[self.variant]
        return {"peft_type": "MISS", "r": self.r, "mini_r": self.mini_r, "init_weights": init,
                "miss_dropout": 0.0, "bias": "none"}

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "Miss":
        """The method an HF `adapter_config.json` describes (`kwargs` add e.g. target_modules)."""
        init = config.get("init_weights", True)
        if init is False:
            raise ValueError("miss: init_weights=False (random debug init) has no equivalent; use True, "
                             "'mini' or 'bat'")
        variant = "balance" if init is True else init
        return cls(r=config.get("r", 64), variant=variant, mini_r=config.get("mini_r", 1), **kwargs)

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        return {"miss_block": np.asarray(adapter["D"], np.float32)}

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        d = jnp.asarray(np.asarray(tensors["miss_block"]), jnp.float32)
        want = self._shape(*kernel.shape, ())
        if d.shape != want:
            raise ValueError(f"miss: miss_block has shape {d.shape}, expected {want} for r={self.r}, "
                             f"variant={self.variant!r} and a kernel of shape {tuple(kernel.shape)}")
        return {"D": d}
