"""WKV7 Pallas kernels for TPU (Mosaic), forward and backward, on the per-chunk math of `chunked.py`.

Grid (B, H, N) with the chunk axis sequential ("arbitrary"): the fp32 state [V, K] (resp. its
gradient) is carried in a VMEM scratch across chunk steps; every chunk step is a handful of MXU
matmuls at HIGHEST precision. Inputs are moved to [B, H, T, *] so that blocks are (L, K) tiles.
The backward is one fused reverse pass: chunk-start states saved by the forward plus the carried
state gradient give all input gradients of the chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rwkv_jax.kernels.wkv7 import chunked

F32 = jnp.float32
PRECISION = lax.Precision.HIGHEST


def _params():
    return pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary'))


def _fwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, y_ref, st_ref, states_ref,
                s_scr):
    # r..b refs [L, K], v/y [L, V], s0/st/states/s_scr [V, K]
    @pl.when(pl.program_id(2) == 0)
    def _():
        s_scr[...] = s0_ref[...]

    s = s_scr[...]
    states_ref[...] = s
    r, w, k, v, a, b = (x[...].astype(F32) for x in (r_ref, w_ref, k_ref, v_ref, a_ref, b_ref))
    p = chunked.chunk_prep(r, w, k, a, b, PRECISION, matmul_cumsum=True)
    y, s, _ = chunked.chunk_forward(p, v, s, PRECISION)
    y_ref[...] = y.astype(y_ref.dtype)
    s_scr[...] = s
    st_ref[...] = s


def _bwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, dy_ref, s_ref, dst_ref,
                dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, ds0_ref, ds_scr):
    # chunks visited last to first; r..b, dr..db [L, K]; v, dy, dv [L, V]; s, dst, ds0 [V, K]
    @pl.when(pl.program_id(2) == 0)
    def _():
        ds_scr[...] = dst_ref[...]

    r, w, k, v, a, b, dy = (x[...].astype(F32) for x in (r_ref, w_ref, k_ref, v_ref, a_ref,
                                                          b_ref, dy_ref))
    p = chunked.chunk_prep(r, w, k, a, b, PRECISION, matmul_cumsum=True)
    grads = chunked.chunk_backward(p, r, k, a, b, v, s_ref[...], dy, ds_scr[...], PRECISION,
                                   matmul_cumsum=True)
    for ref, g in zip((dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref), grads[:6]):
        ref[...] = g.astype(ref.dtype)
    ds_scr[...] = grads[6]
    ds0_ref[...] = grads[6]


def _bhtd(x):
    return jnp.swapaxes(x, 1, 2)  # [B, T, H, D] <-> [B, H, T, D]


def forward(r, w, k, v, a, b, s0, *, chunk_size: int, interpret: bool = False):
    """Padded inputs [B, T, H, *], s0 [B, H, V, K] fp32 -> (y, s_T, states [B, H, N, V, K])."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    L = chunk_size
    N = T // L
    ck = pl.BlockSpec((None, None, L, K), lambda b, h, c: (b, h, c, 0))
    cv = pl.BlockSpec((None, None, L, V), lambda b, h, c: (b, h, c, 0))
    st = pl.BlockSpec((None, None, V, K), lambda b, h, c: (b, h, 0, 0))
    sc = pl.BlockSpec((None, None, None, V, K), lambda b, h, c: (b, h, c, 0, 0))
    y, s_t, states = pl.pallas_call(
        _fwd_kernel,
        grid=(B, H, N),
        in_specs=[ck, ck, ck, cv, ck, ck, st],
        out_specs=[cv, st, sc],
        out_shape=[jax.ShapeDtypeStruct((B, H, T, V), r.dtype),
                   jax.ShapeDtypeStruct((B, H, V, K), F32),
                   jax.ShapeDtypeStruct((B, H, N, V, K), F32)],
        scratch_shapes=[pltpu.VMEM((V, K), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name='wkv7_fwd_tpu',
    )(*(_bhtd(x) for x in (r, w, k, v, a, b)), s0)
    return _bhtd(y), s_t, states


def backward(r, w, k, v, a, b, states, dy, ds_t, *, chunk_size: int, interpret: bool = False):
    """Gradients (dr, dw, dk, dv, da, db in the input dtypes, ds0 [B, H, V, K] fp32)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    L = chunk_size
    N = T // L
    ck = pl.BlockSpec((None, None, L, K), lambda b, h, c: (b, h, N - 1 - c, 0))
    cv = pl.BlockSpec((None, None, L, V), lambda b, h, c: (b, h, N - 1 - c, 0))
    st = pl.BlockSpec((None, None, V, K), lambda b, h, c: (b, h, 0, 0))
    sc = pl.BlockSpec((None, None, None, V, K), lambda b, h, c: (b, h, N - 1 - c, 0, 0))
    xs = [_bhtd(x) for x in (r, w, k, v, a, b, dy.astype(v.dtype))]
    *grads, ds0 = pl.pallas_call(
        _bwd_kernel,
        grid=(B, H, N),
        in_specs=[ck, ck, ck, cv, ck, ck, cv, sc, st],
        out_specs=[ck, ck, ck, cv, ck, ck, st],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs[:6]]
        + [jax.ShapeDtypeStruct((B, H, V, K), F32)],
        scratch_shapes=[pltpu.VMEM((V, K), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name='wkv7_bwd_tpu',
    )(*xs, states, ds_t)
    return tuple(_bhtd(g) for g in grads) + (ds0,)
