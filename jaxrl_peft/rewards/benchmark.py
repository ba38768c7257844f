"""Throughput of the math reward on typical R1-style completions (verifications per second)."""

from __future__ import annotations

import random
import time

import sympy

from jaxrl_peft.data.synthetic import generate, latex
from jaxrl_peft.rewards.math import MathRewardPool, extract_answer, normalize_answer

_FILLER = "Let me double-check the computation step by step. " * 40


def typical_batch(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` distinct (completion, gold) pairs: a third correct as written, a third correct in another
    form (decimal, `Answer:` line, `x = ...`), a third wrong but plausible."""
    rng = random.Random(seed)
    problems = generate(n, seed=seed)
    completions, golds = [], []
    for k, p in enumerate(problems):
        value = sympy.nsimplify(p.answer.replace("\\frac{", "(").replace("}{", ")/(").replace("}", ")"))
        mode = k % 3
        if mode == 0:
            final = f"\\boxed{{{p.answer}}}"
        elif mode == 1:
            form = rng.choice(["decimal", "answer_line", "equation"])
            if form == "decimal" and value.q in (1, 2, 4, 5, 8, 10, 20, 25, 50, 100):
                final = f"\\boxed{{{float(value):g}}}"
            elif form == "answer_line":
                final = f"So the final result follows.\nAnswer: ${p.answer}$"
            else:
                final = f"\\boxed{{x = {p.answer}}}"
        else:
            wrong = value + rng.choice([-2, -1, 1, 2]) * (1 if value.q == 1 else sympy.Rational(1, value.q))
            final = f"\\boxed{{{latex(wrong)}}}"
        completions.append(f"<think>\n{p.problem}\n{_FILLER}{k}\n</think>\n\nTherefore the answer is {final}")
        golds.append(p.answer)
    return completions, golds


def run(n: int = 2000, workers: int = 2, batch_size: int = 256, seed: int = 0) -> float:
    """Verify `n` typical completions in batches; print and return verifications per second
    (excluding worker start-up; the cross-call cache is off so every pair is really checked).
    Also prints the rate of the symbolic path alone (every pair sent to math-verify workers)."""
    completions, golds = typical_batch(n, seed)
    with MathRewardPool(workers=workers, cache_size=0) as pool:
        pool.verify_pairs([("1", "2")] * workers)
        t0 = time.perf_counter()
        total = 0.0
        for s in range(0, n, batch_size):
            total += sum(pool(completions[s : s + batch_size], golds[s : s + batch_size]))
        dt = time.perf_counter() - t0
        stats = dict(pool.stats)
        pairs = [(normalize_answer(extract_answer(c) or ""), normalize_answer(g)) for c, g in zip(completions, golds)]
        t1 = time.perf_counter()
        for s in range(0, n, batch_size):
            pool.verify_pairs(pairs[s : s + batch_size])
        dt_sym = time.perf_counter() - t1
    rate = n / dt
    print(
        f"math_reward: {n} typical completions in {dt:.2f}s = {rate:.0f} verifications/s with {workers} "
        f"workers (accuracy {total / n:.3f}; decided without sympy {stats.get('fast_path', 0)}, "
        f"timed out {stats.get('timed_out', 0)}); math-verify path alone: {n / dt_sym:.0f}/s"
    )
    return rate
