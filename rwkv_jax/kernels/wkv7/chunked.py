"""Chunked (matmul) WKV7 in pure JAX, forward and closed-form backward; also the per-chunk math
that the Pallas kernels reuse.

Inside a chunk of L steps the state is kept in the official layout S[V, K] (row = value index), so
that every decay is a row broadcast. With g the inclusive and ge the exclusive cumulative log decay
and gm a mid-chunk centre (so exp factors stay within exp(±L/2·max|w|)):

    Z = A_ak V + a_s S0^T,  U = (I - A_ab)^{-1} Z        (rows u_t = S_{t-1} a_t)
    Y = A_qk V + A_qb U + q_s S0^T
    S_L = S0 ⊙ exp(g_L) + V^T k_s + U^T b_s

(`../shared/reference/rwkv7_modrwkv.md` §4.3–4.4). The decay gradient uses the identity
dλ_t = Σ_{τ≥t}(r⊙dr − k⊙dk − b⊙db) + Σ_{τ>t} a⊙da + Σ_v S_L⊙dS_L, applied per chunk.

Numerical range: the centred factors need (L/2)·max|w| well below ~40 (fp32 exp range); with
chunk 16 any w ≥ -4 is fine, RWKV-7 itself has w ≥ -0.6065.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST


def _dot(x: jax.Array, y: jax.Array, xc: int, yc: int, precision) -> jax.Array:
    nb = x.ndim - 2
    batch = tuple(range(nb))
    dims = (((nb + xc,), (nb + yc,)), (batch, batch))
    return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=F32)


def mm(x, y, precision=HIGHEST):
    """x @ y over the last two dims (leading dims are batch)."""
    return _dot(x, y, 1, 0, precision)


def mm_nt(x, y, precision=HIGHEST):
    """x @ y^T."""
    return _dot(x, y, 1, 1, precision)


def mm_tn(x, y, precision=HIGHEST):
    """x^T @ y."""
    return _dot(x, y, 0, 0, precision)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _cumsum0(x: jax.Array, use_matmul: bool) -> jax.Array:
    """Inclusive cumsum over the chunk axis (-2); a triangular matmul where cumsum has no lowering."""
    if not use_matmul:
        return jnp.cumsum(x, axis=-2)
    L = x.shape[-2]
    tril = (_iota((L, L), 0) >= _iota((L, L), 1)).astype(F32)
    return mm(jnp.broadcast_to(tril, x.shape[:-2] + (L, L)), x, HIGHEST)


def _tri_inv(A: jax.Array, precision) -> jax.Array:
    """(I - A)^{-1} for strictly lower-triangular A [.., L, L]: Π_s (I + A^{2^s})."""
    L = A.shape[-1]
    eye = (_iota((L, L), 0) == _iota((L, L), 1)).astype(F32)
    x = eye + A
    p = A
    n = 2
    while n < L:
        p = mm(p, p, precision)
        x = x + mm(x, p, precision)
        n *= 2
    return x


class Prep(NamedTuple):
    """State-independent per-chunk quantities ([.., L, K] unless noted)."""

    e_q: jax.Array   # exp(g - gm)
    e_k: jax.Array   # exp(gm - g)
    e_a: jax.Array   # exp(ge - gm)
    e_qs: jax.Array  # exp(g)
    e_as: jax.Array  # exp(ge)
    e_ks: jax.Array  # exp(g_L - g)
    f: jax.Array     # exp(g_L)  [.., 1, K]
    qh: jax.Array
    kh: jax.Array
    bh: jax.Array
    ah: jax.Array
    qs: jax.Array
    as_: jax.Array
    ks: jax.Array
    bs: jax.Array
    a_qk: jax.Array  # [.., L, L] lower incl. diagonal
    a_qb: jax.Array
    a_ak: jax.Array  # [.., L, L] strictly lower
    a_ab: jax.Array
    minv: jax.Array  # (I - a_ab)^{-1}


def chunk_prep(r, w, k, a, b, precision=HIGHEST, matmul_cumsum: bool = False) -> Prep:
    """Everything of a chunk that does not depend on the state; inputs fp32 [.., L, K]."""
    L, K = r.shape[-2:]
    rows = _iota((L, K), 0)
    g = _cumsum0(w, matmul_cumsum)
    ge = g - w
    gl = jnp.sum(w, axis=-2, keepdims=True)  # [.., 1, K]
    gm = jnp.sum(jnp.where(rows < L // 2, w, 0.0), axis=-2, keepdims=True)
    e_q, e_k, e_a = jnp.exp(g - gm), jnp.exp(gm - g), jnp.exp(ge - gm)
    e_qs, e_as, e_ks = jnp.exp(g), jnp.exp(ge), jnp.exp(gl - g)
    qh, kh, bh, ah = r * e_q, k * e_k, b * e_k, a * e_a
    incl = _iota((L, L), 0) >= _iota((L, L), 1)
    strict = _iota((L, L), 0) > _iota((L, L), 1)
    a_qk = jnp.where(incl, mm_nt(qh, kh, precision), 0.0)
    a_qb = jnp.where(incl, mm_nt(qh, bh, precision), 0.0)
    a_ak = jnp.where(strict, mm_nt(ah, kh, precision), 0.0)
    a_ab = jnp.where(strict, mm_nt(ah, bh, precision), 0.0)
    return Prep(e_q, e_k, e_a, e_qs, e_as, e_ks, jnp.exp(gl), qh, kh, bh, ah,
                r * e_qs, a * e_as, k * e_ks, b * e_ks, a_qk, a_qb, a_ak, a_ab,
                _tri_inv(a_ab, precision))


def chunk_u(p: Prep, v, s0, precision=HIGHEST):
    """Rows u_t = S_{t-1} a_t of one chunk [.., L, V] from its start state s0 [.., V, K]."""
    return mm(p.minv, mm(p.a_ak, v, precision) + mm_nt(p.as_, s0, precision), precision)


def chunk_forward(p: Prep, v, s0, precision=HIGHEST):
    """One chunk from state s0 [.., V, K]: returns (y [.., L, V], s_end [.., V, K], u [.., L, V])."""
    u = chunk_u(p, v, s0, precision)
    y = mm(p.a_qk, v, precision) + mm(p.a_qb, u, precision) + mm_nt(p.qs, s0, precision)
    s_end = s0 * p.f + mm_tn(v, p.ks, precision) + mm_tn(u, p.bs, precision)
    return y, s_end, u


def chunk_state_grad(p: Prep, dy, ds_end, precision=HIGHEST):
    """Gradient w.r.t. the chunk-start state given dy [.., L, V] and ds_end [.., V, K]."""
    du = mm_tn(p.a_qb, dy, precision) + mm_nt(p.bs, ds_end, precision)
    dz = mm_tn(p.minv, du, precision)
    return ds_end * p.f + mm_tn(dy, p.qs, precision) + mm_tn(dz, p.as_, precision)


def chunk_backward(p: Prep, r, k, a, b, v, s0, dy, ds_end, precision=HIGHEST,
                   matmul_cumsum: bool = False):
    """All gradients of one chunk: (dr, dw, dk, dv, da, db, ds0); ds_end is dL/dS at the chunk end.

    Only u is recomputed (two [L, L] matmuls and one [L, K] x [K, V]); the chunk-end state is never
    formed: its decay-gradient term Σ_v S_L ⊙ dS_L is assembled from products dk and db need anyway.
    """
    u = chunk_u(p, v, s0, precision)
    L = r.shape[-2]
    incl = _iota((L, L), 0) >= _iota((L, L), 1)
    strict = _iota((L, L), 0) > _iota((L, L), 1)
    du = mm_tn(p.a_qb, dy, precision) + mm_nt(p.bs, ds_end, precision)
    dz = mm_tn(p.minv, du, precision)
    dv = (mm_tn(p.a_qk, dy, precision) + mm_nt(p.ks, ds_end, precision)
          + mm_tn(p.a_ak, dz, precision))
    ds0 = ds_end * p.f + mm_tn(dy, p.qs, precision) + mm_tn(dz, p.as_, precision)
    d_ab = jnp.where(strict, mm_nt(dz, u, precision), 0.0)
    d_ak = jnp.where(strict, mm_nt(dz, v, precision), 0.0)
    d_qb = jnp.where(incl, mm_nt(dy, u, precision), 0.0)
    d_qk = jnp.where(incl, mm_nt(dy, v, precision), 0.0)
    dr = (mm(d_qb, p.bh, precision) + mm(d_qk, p.kh, precision)) * p.e_q \
        + mm(dy, s0, precision) * p.e_qs
    da = (mm(d_ab, p.bh, precision) + mm(d_ak, p.kh, precision)) * p.e_a \
        + mm(dz, s0, precision) * p.e_as
    v_ds = mm(v, ds_end, precision)  # [.., L, K]
    u_ds = mm(u, ds_end, precision)  # [.., L, K]
    dk = (mm_tn(d_qk, p.qh, precision) + mm_tn(d_ak, p.ah, precision)) * p.e_k + v_ds * p.e_ks
    db = (mm_tn(d_qb, p.qh, precision) + mm_tn(d_ab, p.ah, precision)) * p.e_k + u_ds * p.e_ks
    # S_L = S0 ⊙ f + V^T ks + U^T bs, hence
    # Σ_v S_L ⊙ dS_L = f ⊙ Σ_v S0 ⊙ dS_L + Σ_t (ks ⊙ V dS_L + bs ⊙ U dS_L).
    end_term = (p.f * jnp.sum(s0 * ds_end, axis=-2, keepdims=True)
                + jnp.sum(p.ks * v_ds + p.bs * u_ds, axis=-2, keepdims=True))  # [.., 1, K]
    x = r * dr - k * dk - b * db
    xa = a * da
    dw = jnp.sum(x + xa, axis=-2, keepdims=True) - _cumsum0(x + xa, matmul_cumsum) + x + end_term
    return dr, dw, dk, dv, da, db, ds0


def _to_chunks(x: jax.Array, L: int) -> jax.Array:
    B, T, H, D = x.shape
    return x.astype(F32).reshape(B, T // L, L, H, D).transpose(0, 3, 1, 2, 4)  # [B, H, N, L, D]


def _from_chunks(x: jax.Array, dtype) -> jax.Array:
    B, H, N, L, D = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, N * L, H, D).astype(dtype)  # [B, T, H, D]


def _affine(p: Prep, v):
    """Chunk map as affine in S0: S_L = S0 G + Hc, Y = Yl + Qe S0^T (G [.., K, K], Hc [.., V, K])."""
    wt = mm(p.minv, p.as_)  # [.., L, K]
    ul = mm(p.minv, mm(p.a_ak, v))  # [.., L, V]
    K = wt.shape[-1]
    eye = (_iota((K, K), 0) == _iota((K, K), 1)).astype(F32)
    g = eye * p.f + mm_tn(wt, p.bs)
    hc = mm_tn(v, p.ks) + mm_tn(ul, p.bs)
    yl = mm(p.a_qk, v) + mm(p.a_qb, ul)
    qe = mm(p.a_qb, wt) + p.qs
    return g, hc, yl, qe


def forward(r, w, k, v, a, b, s0, *, chunk_size: int, interpret: bool = False):
    """Padded inputs [B, T, H, *] (T % chunk_size == 0), s0 [B, H, V, K] fp32 ->
    (y [B, T, H, V] in r.dtype, s_T [B, H, V, K], chunk-start states [B, H, N, V, K])."""
    del interpret
    L = chunk_size
    rc, wc, kc, vc, ac, bc = (_to_chunks(x, L) for x in (r, w, k, v, a, b))  # [B, H, N, L, *]
    p = chunk_prep(rc, wc, kc, ac, bc)
    g, hc, yl, qe = _affine(p, vc)

    def step(s, gh):
        return mm(s, gh[0]) + gh[1], s

    gh = (jnp.moveaxis(g, 2, 0), jnp.moveaxis(hc, 2, 0))  # [N, B, H, *, K]
    s_t, states = lax.scan(step, s0, gh)
    states = jnp.moveaxis(states, 0, 2)  # [B, H, N, V, K]
    y = yl + mm_nt(qe, states)
    return _from_chunks(y, r.dtype), s_t, states


def backward(r, w, k, v, a, b, states, dy, ds_t, *, chunk_size: int, interpret: bool = False):
    """Gradients (dr, dw, dk, dv, da, db [B, T, H, *] fp32, ds0 [B, H, V, K] fp32)."""
    del interpret
    L = chunk_size
    rc, wc, kc, vc, ac, bc = (_to_chunks(x, L) for x in (r, w, k, v, a, b))
    dyc = _to_chunks(dy, L)
    p = chunk_prep(rc, wc, kc, ac, bc)
    g, _, _, qe = _affine(p, vc)
    qdy = mm_tn(dyc, qe)  # [B, H, N, V, K]

    def step(ds, x):
        g_c, qdy_c = x
        return mm_nt(ds, g_c) + qdy_c, ds

    xs = (jnp.moveaxis(g, 2, 0), jnp.moveaxis(qdy, 2, 0))
    ds0, ds_end = lax.scan(step, ds_t, xs, reverse=True)
    ds_end = jnp.moveaxis(ds_end, 0, 2)  # [B, H, N, V, K]
    grads = chunk_backward(p, rc, kc, ac, bc, vc, states, dyc, ds_end)
    dr, dw, dk, dv, da, db, _ = grads
    return tuple(_from_chunks(x, F32) for x in (dr, dw, dk, dv, da, db)) + (ds0,)
