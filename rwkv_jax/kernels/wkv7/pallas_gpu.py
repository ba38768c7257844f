"""WKV7 Pallas kernels for GPU (Triton lowering), forward and backward.

`pallas_call`s on the per-chunk math of `chunked.py` (state layout [V, K] inside):
  forward    grid (B, H, V/BV): sequential over chunks, state rows [BV, K] in registers; writes y,
             the chunk-start states (fp32, for the backward) and the final state.
The backward is one of two designs, `CONFIG['backward']`:
  'split'  two calls. state grad, grid (B, H, V/BV): reverse sequential pass writing dL/dS at
           every chunk end; grads, grid (B, H, N): every chunk independent, dr, dw, dk, dv, da, db
           from the chunk-start state and the chunk-end state gradient.
  'fused'  one call, grid (B, H): reverse sequential pass carrying dL/dS [V, K] and writing every
           input gradient of each chunk on the way. No dL/dS round trip through HBM, one chunk_prep
           per chunk instead of 1 + V/BV, no second read of the inputs; but B*H programs each doing
           the whole chunk gradient serially (the V split is impossible: dr, dk, da, db, dw sum over V).
Rows of the state (value index) evolve independently, hence the V split of the sequential passes.
fp32 inputs use IEEE fp32 dots; other dtypes TF32 (`precision=DEFAULT`).

The Triton lowering is used (not Mosaic GPU) because it runs under `interpret=True` on CPU, so CI
checks these exact kernels; it is deprecated but present in jax 0.11.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rwkv_jax.kernels.wkv7 import chunked

F32 = jnp.float32
BACKWARDS = ('split', 'fused')
BACKWARD_ENV_VAR = 'RWKV_JAX_WKV7_BACKWARD'
# Launch settings, read at trace time (benchmark.sweep varies them): V block of the sequential
# forward and state-gradient passes, warps of those passes, of the per-chunk gradient pass and of
# the fused pass, pipeline stages, and the backward design (default 'fused', or the env var).
CONFIG = {'block_v': 32, 'num_warps_seq': 4, 'num_warps_grad': 8, 'num_warps_fused': 4,
          'num_stages': None, 'backward': os.environ.get(BACKWARD_ENV_VAR, 'fused')}


def _compiler_params(num_warps: int, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plt
    return plt.CompilerParams(num_warps=num_warps, num_stages=CONFIG['num_stages'])


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else lax.Precision.DEFAULT


def _load_chunk(refs, sl):
    return [ref[sl, :].astype(F32) for ref in refs]


def _fwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, s0_ref, y_ref, st_ref, states_ref, *,
                L, N, precision):
    # r..b refs [T, K], v/y [T, BV], s0/st [BV, K], states [N, BV, K]
    def body(c, s):
        sl = pl.ds(pl.multiple_of(c * L, L), L)
        r, w, k, a, b, v = _load_chunk((r_ref, w_ref, k_ref, a_ref, b_ref, v_ref), sl)
        p = chunked.chunk_prep(r, w, k, a, b, precision)
        states_ref[c] = s
        y, s, _ = chunked.chunk_forward(p, v, s, precision)
        y_ref[sl, :] = y.astype(y_ref.dtype)
        return s

    st_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(F32))


def _dstate_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, dy_ref, dst_ref, dstates_ref, ds0_ref, *,
                   L, N, precision):
    # r..b refs [T, K], dy [T, BV], dst/ds0 [BV, K], dstates [N, BV, K] (dL/dS at chunk ends)
    def body(i, ds):
        c = N - 1 - i
        sl = pl.ds(pl.multiple_of(c * L, L), L)
        r, w, k, a, b, dy = _load_chunk((r_ref, w_ref, k_ref, a_ref, b_ref, dy_ref), sl)
        p = chunked.chunk_prep(r, w, k, a, b, precision)
        dstates_ref[c] = ds
        return chunked.chunk_state_grad(p, dy, ds, precision)

    ds0_ref[...] = lax.fori_loop(0, N, body, dst_ref[...].astype(F32))


def _grad_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, dy_ref, s_ref, ds_ref,
                 dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, *, precision):
    # r..b, dr..db refs [L, K]; v, dy, dv [L, V]; s, ds [V, K]
    r, w, k, v, a, b, dy = (x[...].astype(F32) for x in (r_ref, w_ref, k_ref, v_ref, a_ref,
                                                          b_ref, dy_ref))
    p = chunked.chunk_prep(r, w, k, a, b, precision)
    grads = chunked.chunk_backward(p, r, k, a, b, v, s_ref[...], dy, ds_ref[...], precision)
    for ref, g in zip((dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref), grads[:6]):
        ref[...] = g.astype(ref.dtype)


def _fused_bwd_kernel(r_ref, w_ref, k_ref, v_ref, a_ref, b_ref, dy_ref, states_ref, dst_ref,
                      dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref, ds0_ref, *, L, N, precision):
    # r..b, dr..db refs [T, K]; v, dy, dv [T, V]; states [N, V, K]; dst, ds0 [V, K]
    grad_refs = (dr_ref, dw_ref, dk_ref, dv_ref, da_ref, db_ref)

    def body(i, ds):
        c = N - 1 - i
        sl = pl.ds(pl.multiple_of(c * L, L), L)
        r, w, k, a, b, v, dy = _load_chunk((r_ref, w_ref, k_ref, a_ref, b_ref, v_ref, dy_ref), sl)
        p = chunked.chunk_prep(r, w, k, a, b, precision)
        *grads, ds = chunked.chunk_backward(p, r, k, a, b, v, states_ref[c], dy, ds, precision)
        for ref, g in zip(grad_refs, grads):
            ref[sl, :] = g.astype(ref.dtype)
        return ds

    ds0_ref[...] = lax.fori_loop(0, N, body, dst_ref[...].astype(F32))


def _seq_specs(T, K, bv):
    """Blocks of a sequential pass: grid (B, H, V/bv), or (B, H) when bv is all of V."""
    full_k = pl.BlockSpec((None, T, None, K), lambda b, h, j=0: (b, 0, h, 0))
    part_v = pl.BlockSpec((None, T, None, bv), lambda b, h, j=0: (b, 0, h, j))
    state = pl.BlockSpec((None, None, bv, K), lambda b, h, j=0: (b, h, j, 0))
    return full_k, part_v, state


def forward(r, w, k, v, a, b, s0, *, chunk_size: int, interpret: bool = False):
    """Padded inputs [B, T, H, *], s0 [B, H, V, K] fp32 -> (y, s_T, states [B, H, N, V, K])."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    L = chunk_size
    N = T // L
    bv = min(CONFIG['block_v'], V)
    full_k, part_v, state = _seq_specs(T, K, bv)
    states = pl.BlockSpec((None, None, N, bv, K), lambda b, h, j: (b, h, 0, j, 0))
    kernel = functools.partial(_fwd_kernel, L=L, N=N, precision=_precision(r.dtype))
    return pl.pallas_call(
        kernel,
        grid=(B, H, V // bv),
        in_specs=[full_k, full_k, full_k, part_v, full_k, full_k, state],
        out_specs=[part_v, state, states],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, V), r.dtype),
                   jax.ShapeDtypeStruct((B, H, V, K), F32),
                   jax.ShapeDtypeStruct((B, H, N, V, K), F32)],
        compiler_params=_compiler_params(CONFIG['num_warps_seq'], interpret),
        interpret=interpret,
        name='wkv7_fwd',
    )(r, w, k, v, a, b, s0)


def backward(r, w, k, v, a, b, states, dy, ds_t, *, chunk_size: int, interpret: bool = False):
    """Gradients (dr, dw, dk, dv, da, db in the input dtypes, ds0 [B, H, V, K] fp32)."""
    if CONFIG['backward'] not in BACKWARDS:
        raise ValueError(f"pallas_gpu.CONFIG['backward']={CONFIG['backward']!r} (env var "
                         f'{BACKWARD_ENV_VAR}): expected one of {BACKWARDS}')
    B, T, H, K = r.shape
    V = v.shape[-1]
    L = chunk_size
    N = T // L
    bv = min(CONFIG['block_v'], V)
    precision = _precision(r.dtype)
    dy = dy.astype(v.dtype)
    if CONFIG['backward'] == 'fused':
        full_k, full_v, state = _seq_specs(T, K, V)
        all_states = pl.BlockSpec((None, None, N, V, K), lambda b, h: (b, h, 0, 0, 0))
        grads = pl.pallas_call(
            functools.partial(_fused_bwd_kernel, L=L, N=N, precision=precision),
            grid=(B, H),
            in_specs=[full_k, full_k, full_k, full_v, full_k, full_k, full_v, all_states, state],
            out_specs=[full_k, full_k, full_k, full_v, full_k, full_k, state],
            out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r, w, k, v, a, b)]
            + [jax.ShapeDtypeStruct((B, H, V, K), F32)],
            compiler_params=_compiler_params(CONFIG['num_warps_fused'], interpret),
            interpret=interpret,
            name='wkv7_bwd_fused',
        )(r, w, k, v, a, b, dy, states, ds_t)
        return tuple(grads)
    full_k, part_v, state = _seq_specs(T, K, bv)
    dstates_spec = pl.BlockSpec((None, None, N, bv, K), lambda b, h, j: (b, h, 0, j, 0))
    dstates, ds0 = pl.pallas_call(
        functools.partial(_dstate_kernel, L=L, N=N, precision=precision),
        grid=(B, H, V // bv),
        in_specs=[full_k] * 5 + [part_v, state],
        out_specs=[dstates_spec, state],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, V, K), F32),
                   jax.ShapeDtypeStruct((B, H, V, K), F32)],
        compiler_params=_compiler_params(CONFIG['num_warps_seq'], interpret),
        interpret=interpret,
        name='wkv7_bwd_state',
    )(r, w, k, a, b, dy, ds_t)

    chunk_k = pl.BlockSpec((None, L, None, K), lambda b, h, c: (b, c, h, 0))
    chunk_v = pl.BlockSpec((None, L, None, V), lambda b, h, c: (b, c, h, 0))
    chunk_s = pl.BlockSpec((None, None, None, V, K), lambda b, h, c: (b, h, c, 0, 0))
    grads = pl.pallas_call(
        functools.partial(_grad_kernel, precision=precision),
        grid=(B, H, N),
        in_specs=[chunk_k, chunk_k, chunk_k, chunk_v, chunk_k, chunk_k, chunk_v, chunk_s, chunk_s],
        out_specs=[chunk_k, chunk_k, chunk_k, chunk_v, chunk_k, chunk_k],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r, w, k, v, a, b)],
        compiler_params=_compiler_params(CONFIG['num_warps_grad'], interpret),
        interpret=interpret,
        name='wkv7_bwd_grads',
    )(r, w, k, v, a, b, dy, states, dstates)
    return tuple(grads) + (ds0,)
