"""WKV7 timing: forward and forward+backward (jit, warm-up, block_until_ready, median ms).

    python -c 'from rwkv_jax.kernels.wkv7 import benchmark; benchmark.run(8, 4096, 32, 64)'
    python -c 'from rwkv_jax.kernels.wkv7 import benchmark; benchmark.sweep()'   # GPU launch settings
"""

from __future__ import annotations

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


def _compile_and_time(fn, args, iters: int) -> tuple[float, float]:
    """(compile seconds, median ms of `iters` runs after one warm-up run) of a jitted fn."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return compile_s, statistics.median(times)


def time_impl(args, impl: str, iters: int, chunk_size: int | None = None,
              interpret: bool = False) -> dict:
    """Median forward and forward+backward ms of one implementation, compile seconds apart
    (`interpret`: the Pallas kernels in interpret mode, for CPU checks)."""
    def f(*x):
        return wkv7(*x, impl=impl, chunk_size=chunk_size, interpret=interpret)

    y, s = jax.eval_shape(f, *args)
    cts = (jnp.ones(y.shape, y.dtype), jnp.ones(s.shape, s.dtype))
    fwd_compile_s, fwd_ms = _compile_and_time(jax.jit(f), args, iters)
    fwd_bwd = jax.jit(lambda *x: jax.vjp(f, *x)[1](cts))
    fwd_bwd_compile_s, fwd_bwd_ms = _compile_and_time(fwd_bwd, args, iters)
    return {'fwd_ms': fwd_ms, 'fwd_bwd_ms': fwd_bwd_ms, 'fwd_compile_s': fwd_compile_s,
            'fwd_bwd_compile_s': fwd_bwd_compile_s}


def run(B: int, T: int, H: int, K: int, dtype: str = 'bfloat16', impl: str | None = None,
        iters: int = 20, compare: bool = True, chunk_size: int | None = None) -> dict:
    """Times `impl` (default: the backend's), and with `compare` also 'chunked' and 'reference'.

    Returns {'<impl>_fwd_ms': .., '<impl>_fwd_bwd_ms': .., '<impl>_fwd_compile_s': .., ...,
    'device': ..}; prints one line per figure.
    """
    impl = impl or default_impl()
    args = make_inputs(B, T, H, K, dtype)
    impls = [impl] + ([i for i in ('chunked', 'reference') if i != impl] if compare else [])
    device = jax.devices()[0].device_kind
    out = {'device': device}
    if impl == 'pallas_gpu':
        out['pallas_gpu_config'] = dict(pallas_gpu.CONFIG)
    for name in impls:
        n = iters if name != 'reference' else min(iters, 3)
        try:
            res = time_impl(args, name, n, chunk_size if name == impl else None)
        except Exception as e:  # noqa: BLE001 - report and go on with the other impls
            print(f'wkv7 {name}: failed: {type(e).__name__}: {str(e)[:300]}')
            continue
        out.update({f'{name}_{key}': x for key, x in res.items()})
        for key in ('fwd', 'fwd_bwd'):
            print(f"wkv7 {name} {key} B={B} T={T} H={H} K={K} {dtype} on {device}: "
                  f"{res[key + '_ms']:.3f} ms (compiled in {res[key + '_compile_s']:.1f} s)",
                  flush=True)
    return out


# Launch settings `sweep` times by default: both backward designs, each at a few chunk sizes,
# V blocks and warp counts (keys: chunk_size and any pallas_gpu.CONFIG key). The first is the
# split design's old default, the figure the 15.697 ms of issue 16 was measured with.
SWEEP = (
    {'backward': 'split', 'chunk_size': 16, 'block_v': 32, 'num_warps_seq': 4, 'num_warps_grad': 8},
    {'backward': 'split', 'chunk_size': 16, 'block_v': 64, 'num_warps_seq': 4, 'num_warps_grad': 8},
    {'backward': 'split', 'chunk_size': 16, 'block_v': 32, 'num_warps_seq': 4, 'num_warps_grad': 4},
    {'backward': 'split', 'chunk_size': 32, 'block_v': 32, 'num_warps_seq': 4, 'num_warps_grad': 8},
    {'backward': 'fused', 'chunk_size': 16, 'block_v': 32, 'num_warps_seq': 4, 'num_warps_fused': 4},
    {'backward': 'fused', 'chunk_size': 16, 'block_v': 32, 'num_warps_seq': 4, 'num_warps_fused': 8},
    {'backward': 'fused', 'chunk_size': 32, 'block_v': 32, 'num_warps_seq': 4, 'num_warps_fused': 4},
    {'backward': 'fused', 'chunk_size': 32, 'block_v': 32, 'num_warps_seq': 4, 'num_warps_fused': 8},
)


def sweep(B: int = 8, T: int = 4096, H: int = 32, K: int = 64, dtype: str = 'bfloat16',
          iters: int = 10, settings=SWEEP, impl: str = 'pallas_gpu', interpret: bool = False,
          on_result=None) -> list[dict]:
    """Times `impl` over launch settings (`pallas_gpu.CONFIG` + chunk_size), one line each; best
    first. `on_result(row)` sees every row as it is measured (so a caller killed midway keeps them)."""
    args = make_inputs(B, T, H, K, dtype)
    saved = dict(pallas_gpu.CONFIG)
    rows = []
    try:
        for setting in settings:
            unknown = set(setting) - set(pallas_gpu.CONFIG) - {'chunk_size'}
            if unknown:
                raise ValueError(f'sweep: unknown settings {sorted(unknown)}; expected chunk_size '
                                 f'or keys of pallas_gpu.CONFIG {sorted(pallas_gpu.CONFIG)}')
            pallas_gpu.CONFIG.clear()
            pallas_gpu.CONFIG.update(saved)
            pallas_gpu.CONFIG.update({k: v for k, v in setting.items() if k != 'chunk_size'})
            try:
                res = time_impl(args, impl, iters, setting.get('chunk_size'), interpret)
            except Exception as e:  # noqa: BLE001 - a failing setting is reported, not fatal
                print(f'sweep {setting}: failed: {type(e).__name__}: {str(e)[:200]}', flush=True)
                res = {'error': f'{type(e).__name__}: {str(e)[:200]}'}
            else:
                print(f"sweep {setting}: fwd {res['fwd_ms']:.3f} ms, fwd+bwd {res['fwd_bwd_ms']:.3f} ms",
                      flush=True)
            row = dict(setting) | res
            rows.append(row)
            if on_result:
                on_result(row)
    finally:
        pallas_gpu.CONFIG.clear()
        pallas_gpu.CONFIG.update(saved)
    return sorted((r for r in rows if 'error' not in r), key=lambda x: x['fwd_bwd_ms'])
