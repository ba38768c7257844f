"""Timing helpers every benchmark uses (the benchmarks live beside what they time: `jaxrl_peft/rl/bench.py`,
`jaxrl_peft/train/bench.py`, `rwkv_jax/kernels/wkv7/benchmark.py`)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax

def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def peak_memory_gb() -> float | None:
    """Peak device memory in GB since start, where the backend reports it (GPU/TPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def timed(fn: Callable[[], Any], iters: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `fn()` (outputs blocked on) over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times
