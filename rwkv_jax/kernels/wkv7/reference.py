"""WKV7 ground truth: the per-step recurrence as a `lax.scan` in fp32 (plain autodiff).

Layout (fla `chunk_rwkv7` convention): inputs [B, T, H, K] (v: [B, T, H, V]), state S [B, H, K, V]
(the transpose of the official S[V, K]); `w` is the log of the decay:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,    y_t = S_t^T r_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def wkv7(
    r: jax.Array,
    w: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns (y [B, T, H, V] in r.dtype, final state [B, H, K, V] fp32)."""
    B, _, H, K = r.shape
    V = v.shape[-1]
    if initial_state is None:
        s0 = jnp.zeros((B, H, K, V), jnp.float32)
    else:
        s0 = initial_state.astype(jnp.float32)

    def step(s, x):
        r_t, w_t, k_t, v_t, a_t, b_t = x  # [B, H, K] (v_t: [B, H, V])
        sa = jnp.sum(a_t[..., :, None] * s, axis=-2)  # [B, H, V]
        s = (jnp.exp(w_t)[..., :, None] * s + b_t[..., :, None] * sa[..., None, :]
             + k_t[..., :, None] * v_t[..., None, :])
        y = jnp.sum(r_t[..., :, None] * s, axis=-2)  # [B, H, V]
        return s, y

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (r, w, k, v, a, b))  # [T, B, H, *]
    s_t, ys = lax.scan(step, s0, xs)
    return jnp.moveaxis(ys, 0, 1).astype(r.dtype), s_t
