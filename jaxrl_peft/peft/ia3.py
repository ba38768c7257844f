"""(IA)^3, as Hugging Face PEFT `tuners/ia3` computes it: learned rescaling vectors, init 1.

Feed-forward targets scale their input:  y = W0 (x * l_in) + b,     l_in [in].
Other targets scale their output:        y = (W0 x + b) * l_out,    l_out [out] (bias scaled too).
The paper rescales keys, values and the FFN intermediate, hence the defaults below (PEFT's qwen2
default would be q_proj, v_proj, down_proj).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array, PeftMethod, linear
from jaxrl_peft.peft.registry import register

_GLOB = re.compile(r"[*?\[]")


def _bare(patterns: tuple[str, ...]) -> bool:
    """Whether every pattern is a plain module name (no path, no glob)."""
    return all("/" not in p and not _GLOB.search(p) for p in patterns)


def _to_hf_name(pattern: str) -> str:
    """A module-path pattern as the HF name suffix PEFT matches with `endswith`: layers_3/mlp/x -> layers.3.mlp.x."""
    if _GLOB.search(pattern):
        raise ValueError(f"ia3: feedforward pattern {pattern!r} has no Hugging Face PEFT equivalent; "
                         "use module names or paths")
    return re.sub(r"layers_(\d+)", r"layers.\1", pattern).replace("/", ".")


def _from_hf_name(name: str) -> str:
    """Inverse of `_to_hf_name` (a leading 'model.' of a full HF name dropped)."""
    name = name[len("model."):] if name.startswith("model.") else name
    return re.sub(r"layers\.(\d+)", r"layers_\1", name).replace(".", "/")


@register
@dataclasses.dataclass(frozen=True)
class IA3(PeftMethod):
    """(IA)^3; `feedforward_modules` (module names or paths, like `target_modules`) pick the input-scaled
    layers. Globs work too but have no HF PEFT export."""

    name: ClassVar[str] = "ia3"
    target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple[str, ...] = ("down_proj",)

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        # A set of patterns (HF PEFT stores it as a set): sorted, so equal configs compare equal.
        object.__setattr__(self, "feedforward_modules", tuple(sorted(set(self.feedforward_modules))))
        stray = [p for p in self.feedforward_modules if p not in self.target_modules]
        if stray and _bare(self.target_modules) and _bare(self.feedforward_modules):
            raise ValueError(f"ia3: feedforward_modules {stray} are not in target_modules {self.target_modules}")

    def is_feedforward(self, path: tuple[str, ...]) -> bool:
        joined = "/".join(path)
        return any(fnmatch.fnmatchcase(path[-1], p) or fnmatch.fnmatchcase(joined, p) or
                   fnmatch.fnmatchcase(joined, "*/" + p) for p in self.feedforward_modules)

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        del key, bias
        n_in, n_out = kernel.shape
        if path and self.is_feedforward(path):
            return kernel, {"l_in": jnp.ones((n_in,), jnp.float32)}
        return kernel, {"l_out": jnp.ones((n_out,), jnp.float32)}

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        if "l_in" in adapter:
            return linear(x * adapter["l_in"].astype(x.dtype), kernel, bias)
        return linear(x, kernel, bias) * adapter["l_out"].astype(x.dtype)

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        k32 = kernel.astype(jnp.float32)
        if "l_in" in adapter:
            return k32 * adapter["l_in"][:, None], bias
        l_out = adapter["l_out"]
        return k32 * l_out[None, :], None if bias is None else bias.astype(jnp.float32) * l_out

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        return {k: (kernel_axes[0] if k == "l_in" else kernel_axes[1],) for k in adapter}

    def hf_config(self) -> dict | None:
        return {"peft_type": "IA3", "feedforward_modules": [_to_hf_name(p) for p in self.feedforward_modules],
                "fan_in_fan_out": False, "init_ia3_weights": True}

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "IA3":
        """The method an HF `adapter_config.json` describes (`kwargs` add e.g. target_modules)."""
        ff = config.get("feedforward_modules") or ()
        if isinstance(ff, str):
            raise ValueError("ia3: a regex feedforward_modules is not supported; list the module names")
        return cls(feedforward_modules=tuple(_from_hf_name(n) for n in ff), **kwargs)

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        if "l_in" in adapter:
            return {"ia3_l": np.asarray(adapter["l_in"], np.float32)[None, :]}  # [1, in]
        return {"ia3_l": np.asarray(adapter["l_out"], np.float32)[:, None]}  # [out, 1]

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        n_in, n_out = kernel.shape
        l = np.asarray(tensors["ia3_l"], np.float32)
        if l.shape == (1, n_in) and l.shape != (n_out, 1):
            return {"l_in": jnp.asarray(l[0])}
        if l.shape == (n_out, 1):
            return {"l_out": jnp.asarray(l[:, 0])}
        raise ValueError(f"ia3: ia3_l has shape {l.shape}; expected (1, {n_in}) for a feed-forward layer or "
                         f"({n_out}, 1) otherwise")
