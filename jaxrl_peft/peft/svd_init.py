"""SVD-initialised LoRA with a residual base weight: PiSSA (top-r triplets) and MiLoRA (bottom-r).

With W0 = U S V^T (torch layout [out, in]) and the chosen r triplets, S_r <- S_r / s:
  A = diag(sqrt(S_r)) V_r^T, B = U_r diag(sqrt(S_r)), W_res = W0 - s B A  (the base kernel is replaced).
The adapter keeps the initial factors (lora_a0, lora_b0; frozen) so that everything exported is relative
to the ORIGINAL weight: the HF adapter is PEFT's converted plain LoRA of rank 2r,
  lora_A = [A; A0], lora_B = [B, -B0]  =>  s' B' A' = s (B A - B0 A0) = W_res + s B A - W0,
with alpha doubled (rsLoRA: times sqrt 2) so the scale stays s (PEFT's
`path_initial_model_for_weight_conversion`). `merge` gives W_res + s B A from the residual params.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array
from jaxrl_peft.peft.lora import LoRA, _lora_ab, lora_kwargs_from_hf, to_np
from jaxrl_peft.peft.registry import register


def svd_lowrank(key: Array, w: Array, q: int, niter: int) -> tuple[Array, Array, Array]:
    """Randomized rank-q SVD (Halko et al.; the algorithm of torch.svd_lowrank without oversampling).

    w [m, n] -> (U [m, q], S [q], Vh [q, n]) with `niter` subspace (power) iterations.
    """
    m, n = w.shape
    if m < n:
        u, s, vh = svd_lowrank(key, w.T, q, niter)
        return vh.T, s, u.T
    omega = jax.random.normal(key, (n, q), w.dtype)
    basis = jnp.linalg.qr(w @ omega)[0]  # [m, q]
    for _ in range(niter):
        basis = jnp.linalg.qr(w.T @ basis)[0]  # [n, q]
        basis = jnp.linalg.qr(w @ basis)[0]  # [m, q]
    u, s, vh = jnp.linalg.svd(basis.T @ w, full_matrices=False)  # [q, n] -> u [q, q]
    return basis @ u, s, vh


@dataclasses.dataclass(frozen=True)
class _ResidualLoRA(LoRA):
    """LoRA whose factors start at r singular triplets of W0 and whose base kernel is the residual."""

    residual: ClassVar[bool] = True

    def triplets(self, key: Array, w: Array) -> tuple[Array, Array, Array]:
        """(U_r [out, r], S_r [r], Vh_r [r, in]) of w [out, in] (fp32)."""
        raise NotImplementedError

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        del bias
        d_in, d_out = kernel.shape
        if self.r > min(d_in, d_out):
            raise ValueError(f"PEFT method {self.name!r}: r={self.r} exceeds min(in, out)={min(d_in, d_out)} "
                             f"of module {'/'.join(path) or '?'}")
        w = kernel.astype(jnp.float32).T  # torch layout [out, in]
        u, s, vh = self.triplets(key, w)
        root = jnp.sqrt(s / self.scaling)  # [r]
        a0 = (root[:, None] * vh).T  # [in, r]  (A = diag(sqrt S) Vh)
        b0 = (u * root[None, :]).T  # [r, out] (B = U diag(sqrt S))
        residual = kernel.astype(jnp.float32) - self.scaling * (a0 @ b0)
        dt = jnp.dtype(self.adapter_dtype)
        a0, b0 = a0.astype(dt), b0.astype(dt)
        return residual.astype(kernel.dtype), {"lora_a": a0, "lora_b": b0, "lora_a0": a0, "lora_b0": b0}

    def param_labels(self, adapter: Adapter) -> Any:
        return {k: "frozen" if k in ("lora_a0", "lora_b0") else "default" for k in adapter}

    def reference_adapter(self, adapter: Adapter) -> Adapter:
        """One module's adapter reset to its initial factors: with the residual kernel this is the original
        model (W_res + s B0 A0 = W0), unlike switching the adapter off. Map it over the tree for a KL reference."""
        return {**adapter, "lora_a": adapter["lora_a0"], "lora_b": adapter["lora_b0"]}

    # HF export: a plain LoRA of rank 2r relative to the original weight.
    def hf_config(self) -> dict | None:
        alpha = self.alpha * (math.sqrt(2.0) if self.use_rslora else 2.0)
        base = LoRA(r=2 * self.r, alpha=alpha, dropout=self.dropout, use_rslora=self.use_rslora,
                    target_modules=self.target_modules)
        return base.hf_config()

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        a = np.concatenate([to_np(adapter["lora_a"]), to_np(adapter["lora_a0"])], axis=1)  # [in, 2r]
        b = np.concatenate([to_np(adapter["lora_b"]), -to_np(adapter["lora_b0"])], axis=0)  # [2r, out]
        return {"lora_A.weight": a.T, "lora_B.weight": b.T}

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        """Trained factors of an unconverted PEFT PiSSA adapter (lora_a0/b0 come from re-running init)."""
        a, b = _lora_ab(tensors, kernel, self)
        return {"lora_a": a, "lora_b": b}


@register
@dataclasses.dataclass(frozen=True)
class PiSSA(_ResidualLoRA):
    """PiSSA: principal r singular triplets; `niter` > 0 uses the randomized SVD (PEFT 'pissa_niter_k')."""

    name: ClassVar[str] = "pissa"
    niter: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.niter is not None and (not isinstance(self.niter, int) or self.niter < 0):
            raise ValueError(f"PEFT method 'pissa': niter must be None or an integer >= 0, got {self.niter!r}")

    def triplets(self, key: Array, w: Array) -> tuple[Array, Array, Array]:
        if self.niter is not None:
            return svd_lowrank(key, w, self.r, self.niter)
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        return u[:, :self.r], s[:self.r], vh[:self.r]

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "PiSSA":
        """An unconverted PEFT PiSSA config (init_lora_weights 'pissa' or 'pissa_niter_k')."""
        init = str(config.get("init_lora_weights"))
        niter = int(init.split("_niter_")[-1]) if "_niter_" in init else None
        return cls(**{**lora_kwargs_from_hf(config), "niter": niter, **kwargs})


@register
@dataclasses.dataclass(frozen=True)
class MiLoRA(_ResidualLoRA):
    """MiLoRA: the r smallest singular triplets (deondou/reproduce_lora; not in HF PEFT)."""

    name: ClassVar[str] = "milora"

    def triplets(self, key: Array, w: Array) -> tuple[Array, Array, Array]:
        del key
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        return u[:, -self.r:], s[-self.r:], vh[-self.r:]
