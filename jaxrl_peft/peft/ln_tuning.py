"""LayerNorm tuning, as Hugging Face PEFT `tuners/ln_tuning` does it: train a copy of each norm's gain.

The base gain stays frozen in `params`; the adapter holds the trained copy and `norm_scale` swaps it
in, so merging is the swap. Only the gain goes through the PEFT hook: an affine LayerNorm's bias
(RWKV) is not tuned, unlike PEFT, which copies the whole module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array, PeftMethod
from jaxrl_peft.peft.registry import register

ALL_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


@register
@dataclasses.dataclass(frozen=True)
class LNTuning(PeftMethod):
    """Trains every targeted norm gain (default: all RMSNorms of the decoder; PEFT's qwen2 default
    would be post_attention_layernorm only)."""

    name: ClassVar[str] = "ln_tuning"
    kinds: ClassVar[tuple[str, ...]] = ("norm",)
    target_modules: tuple[str, ...] = ALL_NORMS

    def init_norm(self, key: Array, scale: Array, *, path: tuple[str, ...] = ()) -> Adapter:
        del key, path
        return {"scale": jnp.asarray(scale, jnp.float32)}

    def norm_scale(self, scale: Array, adapter: Adapter) -> Array:
        return adapter["scale"].astype(scale.dtype)

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        return {"scale": tuple(kernel_axes[-1:]) or ("norm",)}

    def hf_config(self) -> dict | None:
        return {"peft_type": "LN_TUNING"}

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "LNTuning":
        """The method an HF `adapter_config.json` describes (`kwargs` add e.g. target_modules)."""
        del config
        return cls(**kwargs)

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        return {"ln_tuning_layers.weight": np.asarray(adapter["scale"], np.float32)}

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        """`kernel` is the norm's base gain [d]."""
        w = np.asarray(tensors["ln_tuning_layers.weight"], np.float32)
        if w.shape != tuple(jnp.shape(kernel)):
            raise ValueError(f"ln_tuning: ln_tuning_layers.weight has shape {w.shape}, expected "
                             f"{tuple(jnp.shape(kernel))}")
        extra = sorted(set(tensors) - {"ln_tuning_layers.weight"})
        if extra:
            raise ValueError(f"ln_tuning: unsupported tensors {extra} (only a norm's weight is tuned)")
        return {"scale": jnp.asarray(w)}
