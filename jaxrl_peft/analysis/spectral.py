"""Singular-spectrum analysis of weight updates: where in W0's spectrum a fine-tune's update ΔK lives.

Kernels are in our layout [in, out]. With ΔK = w1 - w0 and w0 = U S Vᵀ (U: input side [in, r], V: output
side [out, r], r = min(in, out), S descending), decile d holds the singular indices i with ⌊10·i/r⌋ = d.
`analyze` returns, for one kernel pair (key names as in issue 15 and the study's protocol, rlvr_paper.md §7):
  bins_w[d]            share of ‖w0‖² in decile d
  bins_input[d]        ‖U_dᵀ ΔK‖² / ‖ΔK‖²; bins_input_rest: the share outside U's span (0 when r = in)
  bins_output[d]       ‖ΔK V_d‖² / ‖ΔK‖²;  bins_output_rest: the share outside V's span (0 when r = out)
  rank_w_50/80/90      fewest top singular directions holding that share of ‖w0‖² (to within 1e-9)
  dw_in_top_w_90_input / _output   share of ‖ΔK‖² in the top rank_w_90 input / output directions
  dw_singular_values, dw_top1_energy (σ₁²/‖ΔK‖²), dw_effective_rank (exp of the entropy of σ/Σσ over
  σ > 1e-5·σ₁), dw_rel_norm (‖ΔK‖/‖w0‖), cosine (of w1 and w0),
  principal_angles_input / _output  degrees, ascending, between the top-k subspaces of w0 and w1,
  spectral_drift       |σᵢ(w1) − σᵢ(w0)| / σᵢ(w0) for the top k.
When ΔK = 0 every share, dw_top1_energy and dw_effective_rank are 0 (nothing to distribute).

`analyze_run` walks a whole run (base params + adapter + method) one adapted kernel at a time, measuring
PiSSA and MiLoRA against the ORIGINAL weights (their init rewrote the base kernel).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod

NUM_BINS = 10
ENERGY_THRESHOLDS = (50, 80, 90)
EFFECTIVE_RANK_CUTOFF = 1e-5
_THRESHOLD_TOLERANCE = 1e-9
METHODS = ("full", "randomized")
BACKENDS = ("numpy", "jax")


def decile_of(rank: int) -> np.ndarray:
    """Decile ⌊10·i/r⌋ of each singular index i < r: [r] ints in 0..9."""
    return (NUM_BINS * np.arange(rank)) // rank


def randomized_svd(x: Any, q: int, niter: int, start: Any = None, seed: int = 0,
                   xp: Any = np) -> tuple[Any, Any, Any]:
    """Rank-q SVD of x [m, n] by subspace iteration (Halko et al.): (U [m, q], S [q], Vh [q, n]).

    `start` [m, q] seeds the column-space basis (e.g. a nearby matrix's top singular vectors, so that
    few iterations suffice); without it the basis is x times a Gaussian sketch.
    """
    m, n = x.shape
    if start is None:
        sketch = xp.asarray(np.random.default_rng(seed).standard_normal((n, q)), x.dtype)  # [n, q]
        start = x @ sketch
    basis = xp.linalg.qr(start)[0]  # [m, q]
    for _ in range(niter):
        basis = xp.linalg.qr(x @ xp.linalg.qr(x.T @ basis)[0])[0]  # [n, q] -> [m, q]
    u_small, s, vh = xp.linalg.svd(basis.T @ x, full_matrices=False)  # [q, n] -> [q, q], [q], [q, n]
    return basis @ u_small, s, vh


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles in degrees, ascending, between the spans of orthonormal columns a, b [n, k].

    Cosines for the large angles, sines for the small ones (accurate near 0; Björck and Golub).
    """
    cross = a.T @ b  # [k, k]
    cosines = np.linalg.svd(cross, compute_uv=False)  # descending -> angles ascending
    sines = np.linalg.svd(b - a @ cross, compute_uv=False)[::-1]  # ascending
    angles = np.where(cosines ** 2 >= 0.5, np.arcsin(np.clip(sines, 0.0, 1.0)),
                      np.arccos(np.clip(cosines, -1.0, 1.0)))
    return np.degrees(angles)


def effective_rank(singular_values: np.ndarray) -> float:
    """exp of the entropy of σ/Σσ over the σ above 1e-5·σ₁ (0 for a zero matrix)."""
    sigma = np.sort(np.asarray(singular_values, np.float64))[::-1]
    if sigma.size == 0 or sigma[0] <= 0:
        return 0.0
    sigma = sigma[sigma > EFFECTIVE_RANK_CUTOFF * sigma[0]]
    p = sigma / sigma.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def _host(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float64)


def analyze(w0: Any, w1: Any, k: int = 16, method: str = "full", *, dw_rank: int = 256, niter: int = 4,
            oversample: int = 16, seed: int = 0, backend: str = "numpy") -> dict[str, Any]:
    """The spectral quantities of the module docstring for one kernel pair w0, w1 [in, out].

    method='full' takes exact SVDs of w0, w1 and ΔK. method='randomized' still takes w0's full SVD (the
    deciles need all of it) but only the top k (+oversample) of w1, by subspace iteration started at w0's
    top input directions, and the top `dw_rank` singular values of ΔK (exact when rank ΔK ≤ dw_rank, as
    for a LoRA update; otherwise dw_effective_rank counts only those). backend='numpy' computes in
    float64 on the host; 'jax' runs the SVDs and products on JAX's default device (GPU when present) in
    its default float precision.
    """
    if method not in METHODS:
        raise ValueError(f"spectral.analyze: method must be one of {METHODS}, got {method!r}")
    if backend not in BACKENDS:
        raise ValueError(f"spectral.analyze: backend must be one of {BACKENDS}, got {backend!r}")
    if k < 1:
        raise ValueError(f"spectral.analyze: k must be >= 1, got {k}")
    xp = np if backend == "numpy" else jnp
    dtype = np.float64 if backend == "numpy" else jnp.result_type(float)
    w0, w1 = xp.asarray(w0, dtype), xp.asarray(w1, dtype)
    if w0.ndim != 2 or w0.shape != w1.shape:
        raise ValueError(f"spectral.analyze: w0 and w1 must be matrices of one shape, got {w0.shape} and "
                         f"{w1.shape}")
    d_in, d_out = w0.shape
    delta = w1 - w0  # [in, out]

    u0, s0, v0h = xp.linalg.svd(w0, full_matrices=False)  # [in, r], [r], [r, out]
    rank = int(s0.shape[0])
    k = min(k, rank)
    energy_in = _host(xp.sum(xp.square(u0.T @ delta), axis=1))  # [r]: ‖u_iᵀ ΔK‖²
    energy_out = _host(xp.sum(xp.square(delta @ v0h.T), axis=0))  # [r]: ‖ΔK v_i‖²
    w_norm2 = float(xp.sum(xp.square(w0)))
    dw_norm2 = float(xp.sum(xp.square(delta)))
    w1_norm2 = float(xp.sum(xp.square(w1)))
    inner = float(xp.sum(w0 * w1))
    if w_norm2 == 0.0:
        raise ValueError("spectral.analyze: w0 is zero; its spectrum has no shares")

    if method == "full":
        dw_sigma = _host(xp.linalg.svd(delta, compute_uv=False))
        u1, s1, v1h = xp.linalg.svd(w1, full_matrices=False)
    else:
        q_dw = min(dw_rank + oversample, rank)
        dw_sigma = _host(randomized_svd(delta, q_dw, niter, seed=seed, xp=xp)[1])[:min(dw_rank, rank)]
        q_w1 = min(k + oversample, rank)
        u1, s1, v1h = randomized_svd(w1, q_w1, niter, start=u0[:, :q_w1], xp=xp)
    u0_top, v0_top = _host(u0[:, :k]), _host(v0h[:k].T)  # [in, k], [out, k]
    u1_top, v1_top = _host(u1[:, :k]), _host(v1h[:k].T)
    s0, s1 = _host(s0), _host(s1)

    onehot = (decile_of(rank)[:, None] == np.arange(NUM_BINS)[None, :]).astype(np.float64)  # [r, 10]
    energy_w = s0 ** 2
    cumulative = np.cumsum(energy_w) / energy_w.sum()
    ranks = {p: min(int(np.searchsorted(cumulative, p / 100 - _THRESHOLD_TOLERANCE)) + 1, rank)
             for p in ENERGY_THRESHOLDS}
    share = 1.0 / dw_norm2 if dw_norm2 > 0 else 0.0
    rest_in = max(dw_norm2 - energy_in.sum(), 0.0) * share if rank < d_in else 0.0
    rest_out = max(dw_norm2 - energy_out.sum(), 0.0) * share if rank < d_out else 0.0
    top1 = float(dw_sigma[0] ** 2 * share) if dw_sigma.size else 0.0
    return {
        "shape": [int(d_in), int(d_out)],
        "rank": rank,
        "k": k,
        "bins_w": (energy_w @ onehot / energy_w.sum()).tolist(),
        "bins_input": (energy_in @ onehot * share).tolist(),
        "bins_input_rest": float(rest_in),
        "bins_output": (energy_out @ onehot * share).tolist(),
        "bins_output_rest": float(rest_out),
        **{f"rank_w_{p}": ranks[p] for p in ENERGY_THRESHOLDS},
        "dw_in_top_w_90_input": float(energy_in[:ranks[90]].sum() * share),
        "dw_in_top_w_90_output": float(energy_out[:ranks[90]].sum() * share),
        "dw_singular_values": dw_sigma.tolist(),
        "dw_top1_energy": top1,
        "dw_effective_rank": effective_rank(dw_sigma),
        "dw_norm": float(np.sqrt(dw_norm2)),
        "w_norm": float(np.sqrt(w_norm2)),
        "dw_rel_norm": float(np.sqrt(dw_norm2 / w_norm2)),
        "cosine": float(inner / np.sqrt(w_norm2 * w1_norm2)) if w1_norm2 > 0 else 0.0,
        "principal_angles_input": principal_angles(u0_top, u1_top).tolist(),
        "principal_angles_output": principal_angles(v0_top, v1_top).tolist(),
        "spectral_drift": (np.abs(s1[:k] - s0[:k]) / s0[:k]).tolist(),
    }


def original_and_trained(peft_method: PeftMethod, module_params: dict, module_adapter: dict
                         ) -> tuple[jax.Array, jax.Array]:
    """(w0, w1) [in, out] in float32 of one adapted linear: its original and its trained merged kernel.

    A residual method's (PiSSA, MiLoRA) base kernel is W0 minus the initial adapter product, so its
    original is the merge with the adapter reset to its initial factors.
    """
    kernel = jnp.asarray(module_params["kernel"], jnp.float32)
    bias = module_params.get("bias")
    trained = peft_method.merge(kernel, bias, module_adapter)[0]
    if peft_method.residual:
        original = peft_method.merge(kernel, bias, peft_method.reference_adapter(module_adapter))[0]
    else:
        original = kernel
    return original.astype(jnp.float32), trained.astype(jnp.float32)


def describe(name: str) -> dict[str, Any]:
    """Layer index (None outside the decoder blocks) and module kind of a module path 'layers_3/mlp/up_proj'."""
    parts = name.split("/")
    layer = next((int(m.group(1)) for p in parts if (m := re.fullmatch(r"layers_(\d+)", p))), None)
    return {"name": name, "layer": layer, "module": "/".join(p for p in parts if not re.fullmatch(r"layers_\d+", p))}


def analyze_pairs(pairs: Iterable[tuple[str, Any, Any]], k: int = 16, method: str = "full",
                  **options: Any) -> Iterator[dict[str, Any]]:
    """`analyze` of each (name, w0, w1) from any provider, one pair at a time; records carry name/layer/module."""
    for name, w0, w1 in pairs:
        try:
            result = analyze(w0, w1, k, method, **options)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        yield {**describe(name), **result}


def kernel_pairs(original: dict, trained: dict | Callable[[tuple[str, ...]], Any],
                 include: Callable[[tuple[str, ...]], bool] | None = None) -> Iterator[tuple[str, Any, Any]]:
    """(name, w0, w1) for each linear module of `original` that `include` accepts (default: all of them).

    `trained` is a parameter tree of the same model (e.g. a merged export) or a function from a module
    path to its trained kernel [in, out]; only one pair is produced at a time.
    """
    if not callable(trained):
        trained = registry.unstack_layers(trained)  # looked up by per-layer paths 'layers_<i>/...'
    for path, kind, module in registry.modules(original):
        if kind != "linear" or (include is not None and not include(path)):
            continue
        if callable(trained):
            kernel = trained(path)
        else:
            node: Any = trained
            for name in path:
                if not isinstance(node, dict) or name not in node:
                    raise ValueError(f"trained parameters have no module {'/'.join(path)!r}")
                node = node[name]
            kernel = node["kernel"]
        yield "/".join(path), module["kernel"], kernel


def analyze_run(peft_method: PeftMethod, params: dict, adapter: dict, k: int = 16, method: str = "full", *,
                include: Callable[[tuple[str, ...]], bool] | None = None,
                on_record: Callable[[dict[str, Any]], None] | None = None,
                **options: Any) -> list[dict[str, Any]]:
    """`analyze` of every adapted linear of a run, merged through `peft_method.merge`, one kernel at a time.

    `params` are the params the adapter trains against (for PiSSA/MiLoRA the residual ones that
    `registry.init_adapter` returns); the update is measured against the original weights. `on_record`
    sees each record as soon as it is computed (progress, streaming to disk).
    """
    def one(path: tuple[str, ...], kind: str, module: dict, module_adapter: dict | None) -> dict | None:
        if kind != "linear" or not module_adapter or (include is not None and not include(path)):
            return None
        w0, w1 = original_and_trained(peft_method, module, module_adapter)
        record = next(analyze_pairs([("/".join(path), w0, w1)], k, method, **options))
        if on_record is not None:
            on_record(record)
        return record
    return [r for r in registry.map_modules(one, params, adapter) if r is not None]
