"""LoRA and its optimizer-level and scaling variants: rsLoRA, LoRA+, LoRA-FA (rank-1 is LoRA(r=1, alpha=2)).

Per adapted linear (kernel W [in, out]) the adapter holds lora_a [in, r] and lora_b [r, out]; in torch
layout these are lora_A.weight = lora_a.T [r, in] and lora_B.weight = lora_b.T [out, r].
y = x W + b + s * (dropout(x) lora_a) lora_b, s = alpha / r (rsLoRA: alpha / sqrt(r)), as HF PEFT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array, PeftMethod, linear
from jaxrl_peft.peft.registry import register


def dropout(x: Array, rate: float) -> Array:
    """Inverted dropout with a key from the calling module's `dropout` rng stream; identity without one.

    Methods only see (x, W, b, adapter), so the key comes from the linen module being run (the `Linear`
    that called `apply`): pass `rngs={'dropout': key}` to `model.apply` to train with dropout.
    """
    if rate == 0.0:
        return x
    from flax.linen import module as linen_module

    stack = linen_module._context.module_stack
    mod = stack[-1] if stack else None
    if mod is None or not mod.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def kaiming_uniform_a(key: Array, fan_in: int, r: int, dtype: Any) -> Array:
    """torch.nn.init.kaiming_uniform_(A[r, in], a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); returned as [in, r]."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, (fan_in, r), dtype, -bound, bound)


def to_np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _check_common(obj: Any, rank_field: str = "r") -> None:
    """Validates and normalises the shared hyperparameters (lists -> tuples so the method stays hashable)."""
    name = type(obj).name
    r = getattr(obj, rank_field)
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"PEFT method {name!r}: {rank_field} must be a positive integer, got {r!r}")
    if not 0.0 <= float(obj.dropout) < 1.0:
        raise ValueError(f"PEFT method {name!r}: dropout must be in [0, 1), got {obj.dropout!r}")
    targets = obj.target_modules
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"PEFT method {name!r}: target_modules must be non-empty module-name patterns, "
                         f"got {obj.target_modules!r}")
    object.__setattr__(obj, "target_modules", targets)
    object.__setattr__(obj, rank_field, int(r))


def hf_number(x: float) -> float | int:
    """JSON number as PEFT writes it: ints stay ints."""
    return int(x) if float(x).is_integer() else float(x)


@register
@dataclasses.dataclass(frozen=True)
class LoRA(PeftMethod):
    """LoRA (Hu et al.) exactly as HF PEFT's `LoraConfig` with `init_lora_weights` True or 'gaussian'."""

    name: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: str = "kaiming"  # 'kaiming' (PEFT True) | 'gaussian' (A ~ N(0, 1/r^2))
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.alpha <= 0:
            raise ValueError(f"PEFT method {self.name!r}: alpha must be > 0, got {self.alpha!r}")
        if self.init_weights not in ("kaiming", "gaussian"):
            raise ValueError(f"PEFT method {self.name!r}: init_weights must be 'kaiming' or 'gaussian', "
                             f"got {self.init_weights!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    # --- parameters -------------------------------------------------------------------------
    def init_ab(self, key: Array, kernel: Array) -> tuple[Array, Array]:
        """Default LoRA init: (lora_a [in, r], lora_b = 0 [r, out])."""
        d_in, d_out = kernel.shape
        dt = jnp.dtype(self.adapter_dtype)
        if self.init_weights == "gaussian":
            a = jax.random.normal(key, (d_in, self.r), dt) / self.r
        else:
            a = kaiming_uniform_a(key, d_in, self.r, dt)
        return a, jnp.zeros((self.r, d_out), dt)

    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        del bias, path
        a, b = self.init_ab(key, kernel)
        return kernel, {"lora_a": a, "lora_b": b}

    def lora_out(self, x: Array, adapter: Adapter) -> Array:
        """s * (x lora_a) lora_b for an already dropped-out x: [..., in] -> [..., out]."""
        a, b = adapter["lora_a"].astype(x.dtype), adapter["lora_b"].astype(x.dtype)
        return linear(linear(x, a, None), b, None) * jnp.asarray(self.scaling, x.dtype)

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        return linear(x, kernel, bias) + self.lora_out(dropout(x, self.dropout), adapter)

    def delta(self, adapter: Adapter) -> Array:
        """The weight update s * lora_a lora_b [in, out] in fp32."""
        a, b = adapter["lora_a"].astype(jnp.float32), adapter["lora_b"].astype(jnp.float32)
        return self.scaling * (a @ b)

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        return (kernel.astype(jnp.float32) + self.delta(adapter)).astype(kernel.dtype), bias

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        d_in, d_out = kernel_axes
        axes = {"lora_a": (d_in, "rank"), "lora_b": ("rank", d_out), "lora_a0": (d_in, "rank"),
                "lora_b0": ("rank", d_out), "magnitude": (d_out,)}
        return {k: axes.get(k, (None,) * jnp.ndim(v)) for k, v in adapter.items()}

    # --- Hugging Face PEFT format ----------------------------------------------------------
    def hf_config(self) -> dict | None:
        return {
            "peft_type": "LORA", "r": self.r, "lora_alpha": hf_number(self.alpha),
            "lora_dropout": float(self.dropout), "use_rslora": self.use_rslora, "use_dora": False,
            "init_lora_weights": True if self.init_weights == "kaiming" else "gaussian",
            "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {},
            "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "exclude_modules": None,
        }

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        return {"lora_A.weight": to_np(adapter["lora_a"]).T, "lora_B.weight": to_np(adapter["lora_b"]).T}

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        a, b = _lora_ab(tensors, kernel, self)
        return {"lora_a": a, "lora_b": b}

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "LoRA":
        """The method an HF PEFT LoraConfig dict describes (`kwargs` add e.g. target_modules)."""
        return cls(**{**lora_kwargs_from_hf(config), **kwargs})


def lora_kwargs_from_hf(cfg: dict) -> dict:
    """LoRA hyperparameters from an HF LoraConfig dict; rejects the features we do not implement."""
    unsupported = {
        "rank_pattern": bool(cfg.get("rank_pattern")), "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "lora_bias": bool(cfg.get("lora_bias")), "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "modules_to_save": bool(cfg.get("modules_to_save")), "bias": cfg.get("bias", "none") != "none",
        "layers_to_transform": cfg.get("layers_to_transform") is not None,
        "trainable_token_indices": bool(cfg.get("trainable_token_indices")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"adapter_config.json: unsupported LoRA option(s) {bad} (values "
                         f"{ {k: cfg.get(k) for k in bad} })")
    init = cfg.get("init_lora_weights", True)
    return dict(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
                dropout=float(cfg.get("lora_dropout", 0.0)), use_rslora=bool(cfg.get("use_rslora", False)),
                init_weights="gaussian" if init == "gaussian" else "kaiming")


def _lora_ab(tensors: dict[str, Any], kernel: Array, method: LoRA) -> tuple[Array, Array]:
    """lora_a [in, r], lora_b [r, out] from HF tensors lora_A.weight [r, in], lora_B.weight [out, r]."""
    dt = jnp.dtype(method.adapter_dtype)
    a, b = np.asarray(tensors["lora_A.weight"]), np.asarray(tensors["lora_B.weight"])
    d_in, d_out = kernel.shape
    r = method.r
    if a.shape != (r, d_in) or b.shape != (d_out, r):
        raise ValueError(f"LoRA tensors have shapes lora_A {a.shape}, lora_B {b.shape}; expected "
                         f"({r}, {d_in}) and ({d_out}, {r}) for r={r}")
    return jnp.asarray(a.T, dt), jnp.asarray(b.T, dt)


@register
@dataclasses.dataclass(frozen=True)
class RSLoRA(LoRA):
    """Rank-stabilised LoRA: s = alpha / sqrt(r) (the original study's code never applied it)."""

    name: ClassVar[str] = "rslora"
    use_rslora: bool = True


@register
@dataclasses.dataclass(frozen=True)
class LoRAPlus(LoRA):
    """LoRA+ : plain LoRA whose B matrices and 1-D adapter params train at lr * ratio (group 'lora_b')."""

    name: ClassVar[str] = "loraplus"

    def param_labels(self, adapter: Adapter) -> Any:
        return {k: "lora_b" if k == "lora_b" or jnp.ndim(v) == 1 else "default" for k, v in adapter.items()}


@register
@dataclasses.dataclass(frozen=True)
class LoRAFA(LoRA):
    """LoRA-FA: A frozen at its init, only B trains, with PEFT's projected gradient for B.

    A is wrapped in stop_gradient so no gradient (and no activation for it) is computed; the optimizer
    (optim.make_optimizer) preconditions B's gradient with `precondition`.
    """

    name: ClassVar[str] = "lorafa"
    pinv_delta: float = 1e-8

    def lora_out(self, x: Array, adapter: Adapter) -> Array:
        return super().lora_out(x, {**adapter, "lora_a": jax.lax.stop_gradient(adapter["lora_a"])})

    def param_labels(self, adapter: Adapter) -> Any:
        return {k: "frozen" if k == "lora_a" else "lorafa" for k in adapter}

    def precondition(self, grads: Adapter, adapter: Adapter) -> Adapter:
        """g_B <- (1/s^2) (A A^T + delta I)^+ g_B per module (PEFT LoraFAOptimizer), our layout [r, out];
        leading axes (stacked layers) are batch axes."""
        if "lora_b" not in grads:
            return grads
        a = adapter["lora_a"].astype(jnp.float32)  # [..., in, r]
        gram = jnp.swapaxes(a, -1, -2) @ a + self.pinv_delta * jnp.eye(a.shape[-1], dtype=jnp.float32)  # [..., r, r]
        g = jnp.linalg.pinv(gram) @ grads["lora_b"].astype(jnp.float32) / self.scaling ** 2
        return {**grads, "lora_b": g.astype(grads["lora_b"].dtype)}
