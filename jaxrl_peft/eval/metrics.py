"""Accuracy metrics over k samples per problem: unbiased pass@k, avg@k, and their aggregates.

pass@k follows Chen et al. (2021): with n samples of which c are correct, the probability that k
samples drawn without replacement contain a correct one, 1 - C(n-c, k) / C(n, k), computed as a
product so that large n never overflows. With k = n it is 1 if any sample is correct (the study's
"max"); avg@k is the mean correctness over the samples (an unbiased pass@1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct out of `n` samples (1 <= k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_k(correct: Sequence[bool | float]) -> float:
    """Mean correctness of one problem's samples."""
    if len(correct) == 0:
        raise ValueError("avg_at_k: no samples")
    return float(np.mean(np.asarray(correct, np.float64)))


def report_ks(n: int) -> list[int]:
    """The k values worth reporting for n samples: powers of two below n, and n itself."""
    if n < 1:
        raise ValueError(f"report_ks: need n >= 1, got {n}")
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return ks + [n]


def benchmark_metrics(correct: Sequence[Sequence[bool | float]], ks: Iterable[int] | None = None
                      ) -> dict[str, float]:
    """avg@n and pass@k (each k in `ks`, default report_ks(n)) averaged over problems.

    `correct[p]` holds the n correctness flags of problem p; every problem must have the same n.
    """
    if len(correct) == 0:
        raise ValueError("benchmark_metrics: no problems")
    ns = {len(c) for c in correct}
    if len(ns) != 1:
        raise ValueError(f"benchmark_metrics: problems have different sample counts {sorted(ns)}")
    (n,) = ns
    counts = [int(np.sum(np.asarray(c, np.float64) >= 0.5)) for c in correct]
    out = {f"avg@{n}": float(np.mean([avg_at_k(c) for c in correct]))}
    for k in (report_ks(n) if ks is None else ks):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in counts]))
    return out


def unweighted_mean(rows: Mapping[str, Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Per key, the plain mean over benchmarks (each benchmark counts once, whatever its size)."""
    if not rows:
        raise ValueError("unweighted_mean: no benchmarks")
    return {key: float(np.mean([row[key] for row in rows.values()])) for key in keys}
