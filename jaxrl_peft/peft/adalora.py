"""AdaLoRA as HF PEFT implements it: SVD-form adapter, orthogonality regulariser, RankAllocator.

Adapter per linear: lora_a [in, r] (Q^T), lora_e [r] (the singular values Lambda), lora_b [r, out] (P^T);
torch layout lora_A = lora_a.T [r, in], lora_E = lora_e[:, None] [r, 1], lora_B = lora_b.T [out, r].
  y = x W + b + (dropout(x) (lora_a * lora_e)) lora_b * s / (init_r + 1e-5),  s = alpha if alpha > 0 else r.
`on_step` is PEFT's `update_and_allocate`: importance EMAs of |theta * grad|, the cubic budget schedule
and masking of the least important triplets (zeroing lora_e). It is pure jnp and jittable (the
budget table is precomputed on the host with PEFT's float64 formula, so budgets match exactly).
Stacked (scanned) layers are seen layer by layer: the budget, the scores and the state cover every
module of every layer, exactly as for unrolled layers (the state is kept per layer, `layers_<i>`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft.base import Adapter, Array, PeftMethod, linear
from jaxrl_peft.peft.lora import _check_common, dropout, hf_number, to_np
from jaxrl_peft.peft.registry import is_stacked, nest, register, stack_layers, unstack_layers


def _svd_modules(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(path, module dict) for every AdaLoRA module (a dict holding 'lora_e') in an adapter-shaped tree,
    stacked layers one layer at a time (path 'layers_<i>/...')."""
    if not path:
        tree = unstack_layers(tree)
    if isinstance(tree, dict):
        if "lora_e" in tree:
            yield path, tree
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from _svd_modules(v, path + (k,))


def _get(tree: dict, path: tuple[str, ...]) -> dict:
    for p in path:
        tree = tree[p]
    return tree


def _replace(tree: dict, path: tuple[str, ...], leaves: dict) -> dict:
    """A copy of `tree` with the module at `path` updated by `leaves`."""
    if not path:
        return {**tree, **leaves}
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], leaves)}


@register
@dataclasses.dataclass(frozen=True)
class AdaLoRA(PeftMethod):
    """AdaLoRA (Zhang et al. 2023): adaptive rank allocation over SVD-form adapters."""

    name: ClassVar[str] = "adalora"
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_common(self, "init_r")
        if not isinstance(self.target_r, int) or self.target_r < 0:
            raise ValueError(f"PEFT method 'adalora': target_r must be an integer >= 0, got {self.target_r!r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"PEFT method 'adalora': beta1, beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"PEFT method 'adalora': orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.deltaT < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ValueError("PEFT method 'adalora': need deltaT >= 1, tinit >= 0, tfinal >= 0")
        if self.total_step is not None:
            if self.total_step <= 0:
                raise ValueError(f"PEFT method 'adalora': total_step must be > 0, got {self.total_step}")
            if self.tinit >= self.total_step - self.tfinal:
                raise ValueError(f"PEFT method 'adalora': tinit ({self.tinit}) must be < total_step - tfinal "
                                 f"({self.total_step} - {self.tfinal}); no budgeting phase would remain")

    @property
    def scaling(self) -> float:
        """s / (ranknum + 1e-5) with ranknum fixed at init_r, as PEFT's SVDLinear."""
        s = self.alpha if self.alpha > 0 else float(self.init_r)
        return s / (self.init_r + 1e-5)

    # --- parameters -------------------------------------------------------------------------
    def init(self, key: Array, kernel: Array, bias: Array | None = None, *,
             path: tuple[str, ...] = ()) -> tuple[Array, Adapter]:
        del bias, path
        d_in, d_out = kernel.shape
        ka, kb = jax.random.split(key)
        dt = jnp.dtype(self.adapter_dtype)
        return kernel, {"lora_a": 0.02 * jax.random.normal(ka, (d_in, self.init_r), dt),
                        "lora_e": jnp.zeros((self.init_r,), dt),
                        "lora_b": 0.02 * jax.random.normal(kb, (self.init_r, d_out), dt)}

    def apply(self, x: Array, kernel: Array, bias: Array | None, adapter: Adapter) -> Array:
        ae = (adapter["lora_a"] * adapter["lora_e"][None, :]).astype(x.dtype)  # [in, r]
        h = linear(linear(dropout(x, self.dropout), ae, None), adapter["lora_b"].astype(x.dtype), None)
        return linear(x, kernel, bias) + h * jnp.asarray(self.scaling, x.dtype)

    def merge(self, kernel: Array, bias: Array | None, adapter: Adapter) -> tuple[Array, Array | None]:
        a = adapter["lora_a"].astype(jnp.float32) * adapter["lora_e"].astype(jnp.float32)[None, :]
        delta = self.scaling * (a @ adapter["lora_b"].astype(jnp.float32))
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype), bias

    def adapter_axes(self, kernel_axes: tuple[str | None, ...], adapter: Adapter) -> Any:
        d_in, d_out = kernel_axes
        return {"lora_a": (d_in, "rank"), "lora_e": ("rank",), "lora_b": ("rank", d_out)}

    # --- orthogonality regulariser ------------------------------------------------------------
    def regularizer(self, adapter_tree: Any) -> Array:
        """orth_reg_weight * mean over all A and B of ||A A^T - I||_F, ||B^T B - I||_F (torch layout)."""
        norms = []
        for _, mod in _svd_modules(adapter_tree):
            a = mod["lora_a"].astype(jnp.float32)  # [in, r]: torch A A^T = a^T a
            b = mod["lora_b"].astype(jnp.float32)  # [r, out]: torch B^T B = b b^T
            eye = jnp.eye(a.shape[1], dtype=jnp.float32)
            norms.append(jnp.sqrt(jnp.sum(jnp.square(a.T @ a - eye))))
            norms.append(jnp.sqrt(jnp.sum(jnp.square(b @ b.T - eye))))
        if not norms:
            return jnp.zeros((), jnp.float32)
        return self.orth_reg_weight * (sum(norms) / len(norms))

    # --- rank allocation (PEFT RankAllocator) ------------------------------------------------
    def budget_table(self, num_modules: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(budget[t], mask_ind[t]) for t = 0..total_step - tfinal, and the initial budget b0.

        Computed on the host exactly as PEFT's `budget_schedule` (Python floats, int truncation).
        """
        total = self._total_step()
        init_bgt, target_bgt = self.init_r * num_modules, self.target_r * num_modules
        budgets, masks = [], []
        for step in range(total - self.tfinal + 1):
            if step <= self.tinit:
                budget, mask_ind = init_bgt, False
            else:
                mul_coeff = 1 - (step - self.tinit) / (total - self.tfinal - self.tinit)
                budget = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
                mask_ind = step % self.deltaT == 0
            budgets.append(budget)
            masks.append(mask_ind)
        return np.asarray(budgets, np.int32), np.asarray(masks, bool), init_bgt

    def _total_step(self) -> int:
        if self.total_step is None:
            raise ValueError("PEFT method 'adalora': set total_step (the number of training steps) to use "
                             "the rank allocator (on_step)")
        return int(self.total_step)

    def init_state(self, adapter_tree: Any) -> Any:
        """EMAs of sensitivity (ipt) and uncertainty (unc) per adapter element, and the kept-rank pattern."""
        mods = list(_svd_modules(adapter_tree))
        if not mods:
            raise ValueError("PEFT method 'adalora': the adapter tree holds no AdaLoRA module")
        zeros = lambda m: {k: jnp.zeros(m[k].shape, jnp.float32) for k in ("lora_a", "lora_e", "lora_b")}  # noqa: E731
        return {"ipt": nest([(p, zeros(m)) for p, m in mods]), "unc": nest([(p, zeros(m)) for p, m in mods]),
                "pattern": nest([(p, {"keep": jnp.ones(m["lora_e"].shape, bool)}) for p, m in mods])}

    @staticmethod
    def triplet_score(ipt: Adapter, unc: Adapter) -> Array:
        """Importance of each triplet [r]: score(E) + mean score(A row) + mean score(B column)."""
        s_a = jnp.mean(ipt["lora_a"] * unc["lora_a"], axis=0)  # [r]
        s_b = jnp.mean(ipt["lora_b"] * unc["lora_b"], axis=1)  # [r]
        return ipt["lora_e"] * unc["lora_e"] + (s_a + s_b)

    def on_step(self, step: Array, grads: Any, adapter_tree: Any, state: Any) -> tuple[Any, Any]:
        """PEFT `AdaLoraModel.update_and_allocate(step)`: call after the optimizer update of `step`.

        step < T - tfinal: update the EMAs, then mask to the scheduled budget when the schedule says so;
        step == T - tfinal: final mask to target_r * #modules, EMAs reset; after that: re-apply that mask.
        """
        stacked = is_stacked(adapter_tree)
        adapter_tree, grads = unstack_layers(adapter_tree), unstack_layers(grads)
        mods = list(_svd_modules(adapter_tree))
        budgets, mask_inds, init_bgt = self.budget_table(len(mods))
        t_final = self._total_step() - self.tfinal
        step = jnp.asarray(step, jnp.int32)
        idx = jnp.clip(step, 0, t_final)
        budget, mask_ind = jnp.asarray(budgets)[idx], jnp.asarray(mask_inds)[idx]
        updating, finalizing = step < t_final, step == t_final

        ipt, unc, scores = [], [], []
        for path, mod in mods:
            old_ipt, old_unc, g = _get(state["ipt"], path), _get(state["unc"], path), _get(grads, path)
            new_ipt, new_unc = {}, {}
            for leaf in ("lora_a", "lora_e", "lora_b"):
                cur = jnp.abs(mod[leaf].astype(jnp.float32) * g[leaf].astype(jnp.float32))
                avg = self.beta1 * old_ipt[leaf] + (1 - self.beta1) * cur
                dev = self.beta2 * old_unc[leaf] + (1 - self.beta2) * jnp.abs(cur - avg)
                new_ipt[leaf] = jnp.where(updating, avg, old_ipt[leaf])
                new_unc[leaf] = jnp.where(updating, dev, old_unc[leaf])
            ipt.append(new_ipt)
            unc.append(new_unc)
            scores.append(self.triplet_score(new_ipt, new_unc))

        flat = jnp.sort(jnp.concatenate(scores))
        k = init_bgt - budget  # mask the k least important triplets (ties too: torch.kthvalue then <=)
        threshold = jnp.where(k > 0, flat[jnp.clip(k - 1, 0, flat.shape[0] - 1)], -jnp.inf)
        do_mask = (updating & mask_ind) | finalizing
        apply_mask = do_mask | (step > t_final)

        new_tree, pattern = adapter_tree, []
        for (path, mod), score in zip(mods, scores):
            keep = jnp.where(do_mask, score > threshold, _get(state["pattern"], path)["keep"])
            e = jnp.where(apply_mask & ~keep, jnp.zeros_like(mod["lora_e"]), mod["lora_e"])
            new_tree = _replace(new_tree, path, {"lora_e": e})
            pattern.append((path, {"keep": keep}))
        reset = lambda t: jax.tree.map(lambda x: jnp.where(finalizing, jnp.zeros_like(x), x), t)  # noqa: E731
        paths = [p for p, _ in mods]
        new_tree = stack_layers(new_tree) if stacked else new_tree
        return new_tree, {"ipt": reset(nest(list(zip(paths, ipt)))), "unc": reset(nest(list(zip(paths, unc)))),
                          "pattern": nest(pattern)}

    # --- Hugging Face PEFT format ----------------------------------------------------------
    def hf_config(self) -> dict | None:
        # PEFT refuses total_step None; a config without one still loads for inference this way.
        total = self.total_step if self.total_step is not None else self.tinit + self.tfinal + 1
        return {
            "peft_type": "ADALORA", "r": 8, "init_r": self.init_r, "target_r": self.target_r,
            "lora_alpha": hf_number(self.alpha), "lora_dropout": float(self.dropout), "tinit": self.tinit,
            "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight, "total_step": total, "rank_pattern": None,
            "init_lora_weights": True, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        }

    def hf_tensors(self, adapter: Adapter) -> dict[str, Any]:
        return {"lora_A": to_np(adapter["lora_a"]).T, "lora_B": to_np(adapter["lora_b"]).T,
                "lora_E": to_np(adapter["lora_e"])[:, None]}

    def from_hf_tensors(self, tensors: dict[str, Any], kernel: Array) -> Adapter:
        """Masked ranks pruned away by PEFT's rank_pattern come back as zero triplets at the end."""
        a, e, b = (np.asarray(tensors[k]) for k in ("lora_A", "lora_E", "lora_B"))
        d_in, d_out = kernel.shape
        r = a.shape[0]
        if a.shape != (r, d_in) or b.shape != (d_out, r) or e.reshape(-1).shape != (r,) or r > self.init_r:
            raise ValueError(f"AdaLoRA tensors have shapes lora_A {a.shape}, lora_E {e.shape}, lora_B {b.shape}; "
                             f"expected ({self.init_r}, {d_in}), ({self.init_r}, 1), ({d_out}, {self.init_r})")
        pad = self.init_r - r
        dt = jnp.dtype(self.adapter_dtype)
        return {"lora_a": jnp.asarray(np.pad(a.T, ((0, 0), (0, pad))), dt),
                "lora_e": jnp.asarray(np.pad(e.reshape(-1), (0, pad)), dt),
                "lora_b": jnp.asarray(np.pad(b.T, ((0, pad), (0, 0))), dt)}

    @classmethod
    def from_hf_config(cls, config: dict, **kwargs: Any) -> "AdaLoRA":
        """The method an HF AdaLoraConfig dict describes (`kwargs` add e.g. target_modules)."""
        bad = [k for k in ("modules_to_save", "layers_to_transform") if config.get(k)]
        if bad or config.get("bias", "none") != "none":
            raise ValueError(f"adapter_config.json: unsupported AdaLoRA option(s) {bad or ['bias']}")
        return cls(**{**dict(
            init_r=int(config.get("init_r", 12)), target_r=int(config.get("target_r", 8)),
            alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout", 0.0)),
            tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)),
            deltaT=int(config.get("deltaT", 1)), beta1=float(config.get("beta1", 0.85)),
            beta2=float(config.get("beta2", 0.85)), orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
            total_step=config.get("total_step")), **kwargs})
