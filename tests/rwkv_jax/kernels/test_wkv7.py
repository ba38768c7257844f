"""WKV7 parity: every implementation against reference.py (outputs, final state, all gradients);
reference.py against an independent per-step numpy version of the official recurrence."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rwkv_jax.kernels import wkv7 as wkv7_pkg
from rwkv_jax.kernels.wkv7 import chunked, pallas_gpu, pallas_tpu, reference, wkv7

FP32_TOL = 1e-4  # max |Δ| / max |ref|, fp32 inputs
BF16_TOL = 1e-2  # same metric, bf16 inputs and outputs (exact fp32 internals on CPU)
GPU_BF16_TOL = 2e-2  # bf16 inputs on GPU (TF32 matmuls inside the kernel), y and state
GPU_BF16_GRAD_TOL = 5e-2  # bf16 inputs on GPU, gradients
on_gpu = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')


def make_inputs(B, T, H, K, V, dtype=jnp.float32, seed=0, decay_scale=0.6065306597126334):
    """RWKV-7-like inputs (numpy RNG: no per-op compilation): w in (-decay_scale, 0), a = -kk,
    b = kk * iclr with unit-norm kk, and a nonzero initial state."""
    rng = np.random.default_rng(seed)
    r, d, k, kk, c = (rng.standard_normal((B, T, H, K), np.float32) for _ in range(5))
    v = rng.standard_normal((B, T, H, V), np.float32)
    s0 = rng.standard_normal((B, H, K, V), np.float32)
    w = -decay_scale / (1 + np.exp(-d))
    kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
    b = kk / (1 + np.exp(-c))
    return tuple(jnp.asarray(x, dtype) for x in (r, w, k, v, -kk, b)) + (jnp.asarray(s0),)


@functools.lru_cache(maxsize=None)
def _runner(kw):
    def f(*x):
        (y, s), vjp = jax.vjp(lambda *z: wkv7(*z, **dict(kw)), *x)
        dy = jax.random.normal(jax.random.PRNGKey(1), y.shape).astype(y.dtype)
        ds = jax.random.normal(jax.random.PRNGKey(2), s.shape)
        return y, s, vjp((dy, ds))

    return jax.jit(f)


def run_with_grads(args, **kw):
    """(y, final state, grads of a fixed random projection w.r.t. r, w, k, v, a, b, s0)."""
    return _runner(tuple(sorted(kw.items())))(*args)


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), f'{what}: non-finite values'
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= tol, f'{what}: relative error {err:.2e} > {tol:.0e}'


def assert_all_close(got, want, tol, grad_tol=None):
    assert_close(got[0], want[0], tol, 'y')
    assert_close(got[1], want[1], tol, 'final state')
    for name, g, g_ref in zip(('dr', 'dw', 'dk', 'dv', 'da', 'db', 'ds0'), got[2], want[2]):
        assert g.dtype == g_ref.dtype, name
        assert_close(g, g_ref, grad_tol or tol, name)


def numpy_official(r, w, k, v, a, b, s0):
    """Per-step official recurrence in float64, state S[V, K] (the transpose of the public one)."""
    r, w, k, v, a, b = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b))
    B, T, H, _ = r.shape
    y = np.zeros(v.shape)
    s_out = np.zeros(np.asarray(s0).shape)
    for bi in range(B):
        for h in range(H):
            S = np.asarray(s0, np.float64)[bi, h].T.copy()  # [V, K]
            for t in range(T):
                sa = S @ a[bi, t, h]
                S = S * np.exp(w[bi, t, h])[None, :] + np.outer(sa, b[bi, t, h]) \
                    + np.outer(v[bi, t, h], k[bi, t, h])
                y[bi, t, h] = S @ r[bi, t, h]
            s_out[bi, h] = S.T
    return y, s_out


def numpy_official_grads(r, w, k, v, a, b, s0, dy, ds_t):
    """Float64 backpropagation through the per-step official recurrence, written out by hand (no
    autodiff): gradients of Σ y ⊙ dy + Σ S_T ⊙ dS_T w.r.t. (r, w, k, v, a, b, s0), public layouts."""
    r, w, k, v, a, b, s0, dy, ds_t = (np.asarray(x, np.float64)
                                      for x in (r, w, k, v, a, b, s0, dy, ds_t))
    dr, dw, dk, dv, da, db = (np.zeros_like(x) for x in (r, w, k, v, a, b))
    ds0 = np.zeros_like(s0)
    B, T, H, _ = r.shape
    for bi in range(B):
        for h in range(H):
            states = [s0[bi, h].T]  # S_0 .. S_T, each [V, K]
            for t in range(T):
                s = states[-1]
                states.append(s * np.exp(w[bi, t, h])[None, :] + np.outer(s @ a[bi, t, h], b[bi, t, h])
                              + np.outer(v[bi, t, h], k[bi, t, h]))
            ds = ds_t[bi, h].T  # dL/dS_t, [V, K]
            for t in reversed(range(T)):
                s_prev, decay = states[t], np.exp(w[bi, t, h])
                ds = ds + np.outer(dy[bi, t, h], r[bi, t, h])
                dr[bi, t, h] = states[t + 1].T @ dy[bi, t, h]
                dv[bi, t, h] = ds @ k[bi, t, h]
                dk[bi, t, h] = ds.T @ v[bi, t, h]
                db[bi, t, h] = ds.T @ (s_prev @ a[bi, t, h])
                dsa = ds @ b[bi, t, h]  # gradient of S_{t-1} a_t, [V]
                da[bi, t, h] = s_prev.T @ dsa
                dw[bi, t, h] = decay * np.sum(s_prev * ds, axis=0)
                ds = ds * decay[None, :] + np.outer(dsa, a[bi, t, h])
            ds0[bi, h] = ds.T
    return dr, dw, dk, dv, da, db, ds0


def fresh_grads(args, dy, ds, **kw):
    """Gradients of Σ y ⊙ dy + Σ S_T ⊙ ds under a new jit (so pallas_gpu.CONFIG is read afresh)."""
    def f(*x):
        return jax.vjp(lambda *z: wkv7(*z, **kw), *x)[1]((dy.astype(x[0].dtype), ds))

    return jax.jit(f)(*args)


@pytest.fixture(scope='module')
def fp32_case():
    args = make_inputs(2, 45, 2, 16, 32)  # T = 45: not a multiple of the chunk
    return args, run_with_grads(args, impl='reference')


def test_reference_matches_official_numpy():
    args = make_inputs(2, 9, 2, 8, 4, seed=3)
    y, s = jax.jit(reference.wkv7)(*args)
    y_np, s_np = numpy_official(*args)
    assert_close(y, y_np, 1e-5, 'y')
    assert_close(s, s_np, 1e-5, 'final state')


@pytest.mark.parametrize('impl,chunk_size', [
    ('chunked', 16), pytest.param('chunked', 32, marks=pytest.mark.slow), ('pallas_gpu', 16),
    ('pallas_tpu', 16)])
def test_fp32_parity(fp32_case, impl, chunk_size):
    args, want = fp32_case
    got = run_with_grads(args, impl=impl, chunk_size=chunk_size, interpret=True)
    assert_all_close(got, want, FP32_TOL)


@pytest.mark.parametrize('impl,backward', [
    ('reference', None), ('chunked', None), ('pallas_gpu', 'split'), ('pallas_gpu', 'fused')])
def test_grads_match_float64_oracle(monkeypatch, impl, backward):
    """Every backward (autodiff of the scan; closed-form chunked; both Pallas GPU designs in
    interpret mode) against hand-written float64 backpropagation; T = 21 pads the last chunk."""
    args = make_inputs(1, 21, 2, 8, 16, seed=12)
    rng = np.random.default_rng(13)
    dy = rng.standard_normal(args[3].shape).astype(np.float32)
    ds = rng.standard_normal(args[6].shape).astype(np.float32)
    if backward:
        monkeypatch.setitem(pallas_gpu.CONFIG, 'backward', backward)
    kw = {'impl': impl} if impl == 'reference' else {'impl': impl, 'chunk_size': 8,
                                                      'interpret': True}
    got = fresh_grads(args, jnp.asarray(dy), jnp.asarray(ds), **kw)
    want = numpy_official_grads(*args, dy, ds)
    for name, g, g_ref in zip(('dr', 'dw', 'dk', 'dv', 'da', 'db', 'ds0'), got, want):
        assert_close(g, g_ref, FP32_TOL, name)


def test_pallas_gpu_fused_backward_matches_split(monkeypatch):
    """The fused backward against the split one on the same saved states, bf16 inputs (fp32 ones:
    both against the float64 oracle above)."""
    r, w, k, v, a, b, s0 = make_inputs(1, 32, 2, 8, 16, dtype=jnp.bfloat16, seed=14)
    s0 = jnp.swapaxes(s0, -1, -2)  # [B, H, V, K]
    fwd = functools.partial(pallas_gpu.forward, chunk_size=16, interpret=True)
    _, _, states = jax.jit(fwd)(r, w, k, v, a, b, s0)
    dy = jax.random.normal(jax.random.PRNGKey(1), v.shape, v.dtype)
    ds = jax.random.normal(jax.random.PRNGKey(2), s0.shape)
    out = {}
    for design in pallas_gpu.BACKWARDS:
        monkeypatch.setitem(pallas_gpu.CONFIG, 'backward', design)
        bwd = functools.partial(pallas_gpu.backward, chunk_size=16, interpret=True)
        out[design] = jax.jit(bwd)(r, w, k, v, a, b, states, dy, ds)  # traced afresh
    for name, g, g_ref in zip(('dr', 'dw', 'dk', 'dv', 'da', 'db', 'ds0'), out['fused'],
                              out['split']):
        assert g.dtype == g_ref.dtype, name
        assert_close(g, g_ref, BF16_TOL, name)
    monkeypatch.setitem(pallas_gpu.CONFIG, 'backward', 'nope')
    with pytest.raises(ValueError, match='backward'):
        pallas_gpu.backward(r, w, k, v, a, b, states, dy, ds, chunk_size=16, interpret=True)


def test_chunked_strong_decay():
    """Log decay down to -4 per step: the centred chunk factors must stay finite and exact."""
    args = make_inputs(2, 45, 2, 16, 32, seed=4, decay_scale=4.0)  # fp32_case shapes: no recompile
    want = run_with_grads(args, impl='reference')
    got = run_with_grads(args, impl='chunked', chunk_size=16, interpret=True)  # cached runner
    assert_all_close(got, want, FP32_TOL)


@pytest.mark.parametrize('impl', [pytest.param('chunked', marks=pytest.mark.slow), 'pallas_tpu'])
def test_bf16_parity(impl):
    args = make_inputs(1, 24, 2, 16, 16, dtype=jnp.bfloat16, seed=6)
    want = run_with_grads(args, impl='reference')
    got = run_with_grads(args, impl=impl, chunk_size=16, interpret=True)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert_all_close(got, want, BF16_TOL)


def test_no_initial_state_and_exact_chunks():
    r, w, k, v, a, b, _ = make_inputs(2, 32, 2, 8, 8, seed=7)
    y_ref, s_ref = jax.jit(reference.wkv7)(r, w, k, v, a, b)
    y, s = jax.jit(lambda *x: wkv7(*x, impl='chunked', chunk_size=8))(r, w, k, v, a, b)
    assert_close(y, y_ref, FP32_TOL, 'y')
    assert_close(s, s_ref, FP32_TOL, 'final state')


def test_dispatch(monkeypatch):
    monkeypatch.delenv(wkv7_pkg.ENV_VAR, raising=False)
    assert wkv7_pkg.default_impl() == {'gpu': 'pallas_gpu', 'tpu': 'pallas_tpu'}.get(
        jax.default_backend(), 'chunked')
    monkeypatch.setenv(wkv7_pkg.ENV_VAR, 'reference')
    assert wkv7_pkg.default_impl() == 'reference'
    monkeypatch.setenv(wkv7_pkg.ENV_VAR, 'nope')
    with pytest.raises(ValueError, match='RWKV_JAX_WKV7_IMPL'):
        wkv7_pkg.default_impl()
    args = make_inputs(1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match='impl'):
        wkv7(*args, impl='cuda')
    with pytest.raises(ValueError, match='initial_state'):
        wkv7(*args[:6], args[6][..., :2], impl='chunked')


@pytest.mark.slow
def test_tpu_kernel_tpu_interpreter():
    """The Mosaic kernels under the TPU interpreter (uninitialised VMEM is NaN) against chunked."""
    from jax.experimental.pallas import tpu as pltpu
    r, w, k, v, a, b, s0 = make_inputs(1, 32, 2, 16, 32, seed=8)
    s0 = jnp.swapaxes(s0, -1, -2)  # [B, H, V, K]
    params = pltpu.InterpretParams(uninitialized_memory='nan', out_of_bounds_reads='raise')
    want = chunked.forward(r, w, k, v, a, b, s0, chunk_size=16)
    got = pallas_tpu.forward(r, w, k, v, a, b, s0, chunk_size=16, interpret=params)
    for g, x, name in zip(got, want, ('y', 'final state', 'states')):
        assert_close(g, x, FP32_TOL, name)
    dy = jax.random.normal(jax.random.PRNGKey(1), want[0].shape)
    ds = jax.random.normal(jax.random.PRNGKey(2), want[1].shape)
    want = chunked.backward(r, w, k, v, a, b, want[2], dy, ds, chunk_size=16)
    got = pallas_tpu.backward(r, w, k, v, a, b, got[2], dy, ds, chunk_size=16, interpret=params)
    for g, x, name in zip(got, want, ('dr', 'dw', 'dk', 'dv', 'da', 'db', 'ds0')):
        assert_close(g, x, FP32_TOL, name)


@pytest.mark.slow
def test_long_sequence_chunked():
    args = make_inputs(1, 1000, 2, 32, 32, seed=9)
    assert_all_close(run_with_grads(args, impl='chunked'), run_with_grads(args, impl='reference'),
                     FP32_TOL)


def run_with_grads_fresh(args, **kw):
    """`run_with_grads` under a new jit: pallas_gpu.CONFIG is read afresh."""
    return _runner.__wrapped__(tuple(sorted(kw.items())))(*args)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize('impl,backward', [
    ('pallas_gpu', 'split'), ('pallas_gpu', 'fused'), ('chunked', None)])
@pytest.mark.parametrize('T', [4096, 200])
def test_gpu_fp32(monkeypatch, impl, backward, T):
    if backward:
        monkeypatch.setitem(pallas_gpu.CONFIG, 'backward', backward)
    args = make_inputs(2, T, 4, 64, 64, seed=10)
    assert_all_close(run_with_grads_fresh(args, impl=impl),
                     run_with_grads(args, impl='reference'), FP32_TOL)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize('backward', ['split', 'fused'])
@pytest.mark.parametrize('chunk_size', [16, 32])
def test_gpu_bf16(monkeypatch, backward, chunk_size):
    monkeypatch.setitem(pallas_gpu.CONFIG, 'backward', backward)
    args = make_inputs(2, 1000, 4, 64, 64, dtype=jnp.bfloat16, seed=11)
    got = run_with_grads_fresh(args, impl='pallas_gpu', chunk_size=chunk_size)
    assert_all_close(got, run_with_grads(args, impl='reference'), GPU_BF16_TOL,
                     GPU_BF16_GRAD_TOL)
