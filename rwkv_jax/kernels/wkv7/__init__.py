"""WKV7 (RWKV-7 time-mix recurrence) with a custom VJP, dispatched by backend.

`wkv7(r, w, k, v, a, b, initial_state)` follows fla's `chunk_rwkv7`: inputs [B, T, H, K] (v may be
[B, T, H, V]), `w` = log decay (≤ 0), `a = -kk`, `b = kk * iclr`, state [B, H, K, V] fp32.
Implementations: 'reference' (lax.scan), 'chunked' (pure JAX), 'pallas_gpu' (Pallas Triton),
'pallas_tpu' (Pallas Mosaic TPU). Default by `jax.default_backend()`, overridden by the env var
RWKV_JAX_WKV7_IMPL or the `impl=` argument. The GPU backward design ('fused' one pass or 'split'
state-gradient + per-chunk passes) is `pallas_gpu.CONFIG['backward']`, env var RWKV_JAX_WKV7_BACKWARD.
"""

from __future__ import annotations

import functools
import importlib
import os

import jax
import jax.numpy as jnp

from rwkv_jax.kernels.wkv7 import reference

IMPLS = ('reference', 'chunked', 'pallas_gpu', 'pallas_tpu')
ENV_VAR = 'RWKV_JAX_WKV7_IMPL'
DEFAULT_CHUNK = {'chunked': 16, 'pallas_gpu': 16, 'pallas_tpu': 64}


def default_impl() -> str:
    """The implementation `wkv7` uses when `impl` is not given."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in IMPLS:
            raise ValueError(f'{ENV_VAR}={env!r}: expected one of {IMPLS}')
        return env
    return {'gpu': 'pallas_gpu', 'tpu': 'pallas_tpu'}.get(jax.default_backend(), 'chunked')


def _module(impl: str):
    return importlib.import_module(f'rwkv_jax.kernels.wkv7.{impl}')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _core(impl, chunk_size, interpret, r, w, k, v, a, b, s0):
    y, s_t, _ = _module(impl).forward(r, w, k, v, a, b, s0, chunk_size=chunk_size,
                                      interpret=interpret)
    return y, s_t


def _core_fwd(impl, chunk_size, interpret, r, w, k, v, a, b, s0):
    y, s_t, states = _module(impl).forward(r, w, k, v, a, b, s0, chunk_size=chunk_size,
                                           interpret=interpret)
    return (y, s_t), (r, w, k, v, a, b, states)


def _core_bwd(impl, chunk_size, interpret, res, cts):
    r, w, k, v, a, b, states = res
    dy, ds_t = cts
    grads = _module(impl).backward(r, w, k, v, a, b, states, dy, ds_t.astype(jnp.float32),
                                   chunk_size=chunk_size, interpret=interpret)
    dtypes = [x.dtype for x in (r, w, k, v, a, b)] + [jnp.float32]
    return tuple(g.astype(d) for g, d in zip(grads, dtypes))


_core.defvjp(_core_fwd, _core_bwd)


def wkv7(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    impl: str | None = None,
    chunk_size: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """RWKV-7 WKV: returns (y [B, T, H, V] in r.dtype, final state [B, H, K, V] fp32).

    `interpret=True` runs the Pallas kernels in interpret mode (CPU testing).
    """
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f'wkv7: impl={impl!r}, expected one of {IMPLS}')
    B, T, H, K = r.shape
    V = v.shape[-1]
    for name, x in (('w', w), ('k', k), ('a', a), ('b', b)):
        if x.shape != r.shape:
            raise ValueError(f'wkv7: {name} has shape {x.shape}, expected r.shape {r.shape}')
    if v.shape[:3] != (B, T, H):
        raise ValueError(f'wkv7: v has shape {v.shape}, expected ({B}, {T}, {H}, V)')
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f'wkv7: initial_state has shape {initial_state.shape}, '
                         f'expected {(B, H, K, V)}')
    if impl == 'reference':
        return reference.wkv7(r, w, k, v, a, b, initial_state)

    L = chunk_size or DEFAULT_CHUNK[impl]
    if L < 2 or L & (L - 1):
        raise ValueError(f'wkv7: chunk_size={L} must be a power of two >= 2')
    if initial_state is None:
        s0 = jnp.zeros((B, H, V, K), jnp.float32)
    else:
        s0 = jnp.swapaxes(initial_state.astype(jnp.float32), -1, -2)  # [B, H, V, K]
    pad = -T % L
    if pad:
        # Padded steps are identity transitions: log decay 0 and k = v = a = b = 0.
        r, w, k, v, a, b = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                            for x in (r, w, k, v, a, b))
    y, s_t = _core(impl, L, interpret, r, w, k, v, a, b, s0)
    return y[:, :T], jnp.swapaxes(s_t, -1, -2)
