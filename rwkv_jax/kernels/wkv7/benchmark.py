"""WKV7 timing: forward and forward+backward (jit, warm-up, block_until_ready, median ms).

    python -c 'from rwkv_jax.kernels.wkv7 import benchmark; benchmark.run(8, 4096, 32, 64)'
"""

from __future__ import annotations

import itertools
import statistics
import time

import jax
import jax.numpy as jnp

from rwkv_jax.kernels.wkv7 import default_impl, pallas_gpu, wkv7


def make_inputs(B: int, T: int, H: int, K: int, dtype='bfloat16', seed: int = 0):
    """RWKV-7-like inputs: log decay in (-0.6065, 0), unit-norm removal key kk, a = -kk, b = kk*iclr."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    shape = (B, T, H, K)
    r = jax.random.normal(ks[0], shape)
    w = -0.6065306597126334 * jax.nn.sigmoid(jax.random.normal(ks[1], shape))
    k = jax.random.normal(ks[2], shape)
    v = jax.random.normal(ks[3], shape)
    kk = jax.random.normal(ks[4], shape)
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = jax.nn.sigmoid(jax.random.normal(ks[5], shape))
    s0 = 0.1 * jax.random.normal(ks[6], (B, H, K, K))
    xs = tuple(x.astype(dtype) for x in (r, w, k, v, -kk, kk * iclr))
    return xs + (s0,)


def _median_ms(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_impl(args, impl: str, iters: int, chunk_size: int | None = None) -> dict:
    """Median forward and forward+backward ms of one implementation."""
    def f(*x):
        return wkv7(*x, impl=impl, chunk_size=chunk_size)

    fwd = jax.jit(f)
    y, s = jax.eval_shape(f, *args)
    cts = (jnp.ones(y.shape, y.dtype), jnp.ones(s.shape, s.dtype))
    fwd_bwd = jax.jit(lambda *x: jax.vjp(f, *x)[1](cts))
    return {'fwd_ms': _median_ms(fwd, args, iters), 'fwd_bwd_ms': _median_ms(fwd_bwd, args, iters)}


def run(B: int, T: int, H: int, K: int, dtype: str = 'bfloat16', impl: str | None = None,
        iters: int = 20, compare: bool = True, chunk_size: int | None = None) -> dict:
    """Times `impl` (default: the backend's), and with `compare` also 'chunked' and 'reference'.

    Returns {'<impl>_fwd_ms': .., '<impl>_fwd_bwd_ms': .., ..., 'device': ..}; one line per figure.
    """
    impl = impl or default_impl()
    args = make_inputs(B, T, H, K, dtype)
    impls = [impl] + ([i for i in ('chunked', 'reference') if i != impl] if compare else [])
    device = jax.devices()[0].device_kind
    out = {'device': device}
    for name in impls:
        n = iters if name != 'reference' else min(iters, 3)
        try:
            res = time_impl(args, name, n, chunk_size if name == impl else None)
        except Exception as e:  # noqa: BLE001 - report and go on with the other impls
            print(f'wkv7 {name}: failed: {type(e).__name__}: {str(e)[:300]}')
            continue
        for key, ms in res.items():
            out[f'{name}_{key}'] = ms
            print(f'wkv7 {name} {key[:-3]} B={B} T={T} H={H} K={K} {dtype} on {device}: '
                  f'{ms:.3f} ms')
    return out


def sweep(B: int = 8, T: int = 4096, H: int = 32, K: int = 64, dtype: str = 'bfloat16',
          iters: int = 10, chunk_sizes=(16, 32), block_vs=(32, 64), warps_seq=(4, 8),
          warps_grad=(8,)) -> list[dict]:
    """Times pallas_gpu over launch settings (`pallas_gpu.CONFIG`), one line each; best first."""
    args = make_inputs(B, T, H, K, dtype)
    saved = dict(pallas_gpu.CONFIG)
    rows = []
    try:
        for L, bv, ws, wg in itertools.product(chunk_sizes, block_vs, warps_seq, warps_grad):
            pallas_gpu.CONFIG.update(block_v=bv, num_warps_seq=ws, num_warps_grad=wg)
            cfg = {'chunk_size': L, 'block_v': bv, 'num_warps_seq': ws, 'num_warps_grad': wg}
            try:
                res = time_impl(args, 'pallas_gpu', iters, L)
            except Exception as e:  # noqa: BLE001 - a failing setting is reported, not fatal
                print(f'sweep {cfg}: failed: {type(e).__name__}: {str(e)[:200]}')
                continue
            rows.append(cfg | res)
            print(f"sweep {cfg}: fwd {res['fwd_ms']:.3f} ms, fwd+bwd {res['fwd_bwd_ms']:.3f} ms")
    finally:
        pallas_gpu.CONFIG.clear()
        pallas_gpu.CONFIG.update(saved)
    return sorted(rows, key=lambda x: x['fwd_bwd_ms'])
