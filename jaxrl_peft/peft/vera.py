"""VeRA (vector-based random matrix adaptation), as Hugging Face PEFT `tuners/vera` computes it.

One pair of frozen random projections is shared by every adapted layer: A [r, in_max], B [out_max, r]
(kaiming-uniform, gain sqrt(2), drawn in that order from a torch CPU generator seeded with
`projection_prng_key`). Each layer trains lambda_d [r] (init `d_initial`) and lambda_b [out] (init 0):
    y = W0 x + b + lambda_b * (B[:out] (lambda_d * (A[:, :in] x))).

A `Linear` only sees its own adapter entry, so each layer keeps its own frozen slices of the shared
projections (labelled 'frozen': no gradient use, no optimizer state, not counted as trainable).
The projections depend on the largest adapted layer, so the method must know `projection_shape`
(out_max, in_max) before `init`: `method.prepare(params)` fills it from the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array, PeftMethod, linear
from jaxrl_peft.peft.registry import modules, register

# The shared projections in HF PEFT's saved adapter (`save_projection=True`).
HF_SHARED_A, HF_SHARED_B = "base_model.vera_A", "base_model.vera_B"


def _torch_uniform(bits: np.ndarray, bound: float) -> np.ndarray:
    """torch's CPU `uniform_(-bound, bound)` (float32) given the generator's 32-bit draws."""
    lo, hi = np.float32(-bound), np.float32(bound)
    width = np.float64(np.float32(hi - lo))  # computed in float32, then used in double like ATen
    u = (bits & np.uint64((1 << 24) - 1)).astype(np.float64) * 2.0 ** -24
    return (u * width + np.float64(lo)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def projections(seed: int, r: int, out_max: int, in_max: int) -> tuple[np.ndarray, np.ndarray]:
    """HF PEFT's shared projections (A [r, in_max], B [out_max, r]), bit-exact and without torch.

    torch's CPU generator is MT19937 seeded like numpy's legacy RandomState; each float32 uniform
    consumes one 32-bit draw, A first then B (`VeraModel._init_vera_A_vera_B`).
    """
    mt = np.random.MT19937()
    mt.state = {"bit_generator": "MT19937", "state": dict(zip(
        ("key", "pos"), np.random.RandomState(seed).get_state()[1:3]))}
    bits = mt.random_raw(r * in_max + out_max * r).astype(np.uint64)
    gain_bound = math.sqrt(3.0) * math.sqrt(2.0)  # kaiming-uniform with gain sqrt(2): bound = sqrt(6 / fan_in)
    a = _torch_uniform(bits[:r * in_max], gain_bound / math.sqrt(in_max)).reshape(r, in_max)
    b = _torch_uniform(bits[r * in_max:], gain_bound / math.sqrt(r)).reshape(out_max, r)
    a.flags.writeable = b.flags.writeable = False
    return a, b


@register
@dataclasses.dataclass(frozen=True)
class Vera(PeftMethod):
    """VeRA with rank `r`; `projection_shape` = (out_max, in_max), set by `prepare(params)`."""

    name: ClassVar[str] = "vera"
    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True
    projection_shape: tuple[int, int] | None = None

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"vera: r must be a positive integer, got {self.r}")
        if not 0 <= self.projection_prng_key < 2 ** 32:
            raise ValueError(f"vera: projection_prng_key must be in [0, 2**32), got {self.projection_prng_key}")
        if self.projection_shape is not None:
            object.__setattr__(self, "projection_shape", tuple(int(n) for n in self.projection_shape))

    def prepare(self, params: dict) -> "Vera":
        """This method with `projection_shape` set to the largest (out, in) over the targeted layers."""
        shapes = [mod["kernel"].shape for path, kind, mod in modules(params) if self.targets(path, kind)]
        if not shapes:
            raise ValueError(f"vera: target_modules {self.target_modules} matched no linear module")
        return dataclasses.replace(self, projection_shape=(max(s[1] for s in shapes), max(s[0] for s in shapes)))

    def _projections(self) -> tuple[np.ndarray, np.ndarray]:
        if self.projection_shape is None:
            raise ValueError("vera: the shared projections are sized by the largest adapted layer; build the "
                             "method with `method.prepare(params)` (or pass projection_shape=(out_max, in_max))")
        return projections(self.projection_prng_key, self.r, *self.projection_shape)

    def _slices(self, a: np.ndarray, b: np.ndarray, n_in: int, n_out: int, where: str) -> dict[str, Array]:
        if a.shape[1] < n_in or b.shape[0] < n_out or a.shape[0] != self.r or b.shape[1] != self.r:
            raise ValueError(f"vera: shared projections A {a.shape}, B {b.shape} do not cover {where} "
                             f"(in={n_in}, out={n_out}, r={self.r})")
        return {"A": jnp.asarray(a[:, :n_in].T, jnp.float32),  # [in, r]
                "B": jnp.asarray(b[:n_out, :].T, jnp.float32)}  # [r, out]

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        del key, bias
        n_in, n_out = kernel.shape
        a, b = self._projections()
        return kernel, {"lambda_b": jnp.zeros((n_out,), jnp.float32),
                        "lambda_d": jnp.full((self.r,), self.d_initial, jnp.float32),
                        **self._slices(a, b, n_in, n_out, "/".join(path) or "module")}

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        dt = x.dtype
        a, b = (jax.lax.stop_gradient(adapter[k]).astype(dt) for k in ("A", "B"))
        h = linear(x, a, None) * adapter["lambda_d"].astype(dt)  # [..., r]
        return linear(x, kernel, bias) + linear(h, b, None) * adapter["lambda_b"].astype(dt)

    def delta(self, adapter: Adapter) -> Array:
        """The weight update in kernel layout [in, out]: A diag(lambda_d) B diag(lambda_b)."""
        return (adapter["A"] * adapter["lambda_d"][None]) @ (adapter["B"] * adapter["lambda_b"][None])

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        return kernel.astype(jnp.float32) + self.delta(adapter), bias

    def param_labels(self, adapter: Adapter) -> Any:
        return {k: "frozen" if k in ("A", "B") else "default" for k in adapter}

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        ax_in, ax_out = kernel_axes
        axes = {"lambda_b": (ax_out,), "lambda_d": ("rank",), "A": (ax_in, "rank"), "B": ("rank", ax_out)}
        return {k: axes[k] for k in adapter}

    def hf_config(self) -> dict | None:
        return {"peft_type": "VERA", "r": self.r, "projection_prng_key": self.projection_prng_key,
                "save_projection": self.save_projection, "d_initial": self.d_initial, "vera_dropout": 0.0,
                "fan_in_fan_out": False, "bias": "none", "init_weights": True}

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "Vera":
        """The method an HF `adapter_config.json` describes (dropout only matters in training: ignored)."""
        return cls(r=config.get("r", 256), d_initial=config.get("d_initial", 0.1),
                   projection_prng_key=config.get("projection_prng_key", 0),
                   save_projection=config.get("save_projection", True), **kwargs)

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        return {"vera_lambda_b": np.asarray(adapter["lambda_b"], np.float32),
                "vera_lambda_d": np.asarray(adapter["lambda_d"], np.float32)}

    def hf_shared_tensors(self, adapter_tree: dict) -> dict[str, Any]:
        """Model-level tensors of the HF adapter file: the shared projections when `save_projection`.

        Rebuilt from the per-layer slices: the widest layer holds all of A, the tallest all of B.
        """
        if not self.save_projection:
            return {}
        entries = []

        def walk(node: dict) -> None:
            if "A" in node and "B" in node and not isinstance(node["A"], dict):
                entries.append(node)
            for v in node.values():
                if isinstance(v, dict):
                    walk(v)
        walk(adapter_tree)
        if not entries:
            raise ValueError("vera: the adapter tree holds no VeRA layer")
        a = max((e["A"] for e in entries), key=lambda t: t.shape[0])  # [in_max, r]
        b = max((e["B"] for e in entries), key=lambda t: t.shape[1])  # [r, out_max]
        return {HF_SHARED_A: np.asarray(a, np.float32).T, HF_SHARED_B: np.asarray(b, np.float32).T}

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        """One layer's adapter from its HF tensors; the shared projections come from `tensors['vera_A']`
        / `tensors['vera_B']` when the file has them (HF's saved `base_model.vera_A/B`), else from the
        seed and `projection_shape` as HF PEFT regenerates them."""
        n_in, n_out = kernel.shape
        lam_b = np.asarray(tensors["vera_lambda_b"], np.float32).reshape(-1)
        lam_d = np.asarray(tensors["vera_lambda_d"], np.float32).reshape(-1)
        if lam_b.shape != (n_out,) or lam_d.shape != (self.r,):
            raise ValueError(f"vera: vera_lambda_b {lam_b.shape} / vera_lambda_d {lam_d.shape} do not match "
                             f"out={n_out}, r={self.r}")
        if "vera_A" in tensors and "vera_B" in tensors:
            a, b = np.asarray(tensors["vera_A"], np.float32), np.asarray(tensors["vera_B"], np.float32)
        else:
            a, b = self._projections()
        return {"lambda_b": jnp.asarray(lam_b), "lambda_d": jnp.asarray(lam_d),
                **self._slices(a, b, n_in, n_out, "module")}
