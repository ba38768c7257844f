"""Synthetic math problems with exact answers (sympy), at graded difficulty, seeded and random-access.

Used by the embedded default (tiny models learn them), by tests, and for supervised warm-up: each
problem also has an R1-style solution `<think>...</think> ... \\boxed{answer}`.
"""

from __future__ import annotations

import dataclasses
import decimal
import random
import re
from collections.abc import Callable, Sequence

import sympy

KINDS = ("arithmetic", "fractions", "linear", "percent", "modular", "quadratic")
LEVELS = (1, 2, 3, 4, 5)
GUESS_OPENING = "Quick guess:"  # how a guessed completion starts its reasoning (see r1_guess)


@dataclasses.dataclass(frozen=True)
class SyntheticProblem:
    """A problem, its gold answer as LaTeX, and a short R1-style worked solution."""

    problem: str
    answer: str
    kind: str
    level: int
    steps: tuple[str, ...]

    def r1_solution(self) -> str:
        """Completion in the R1 format: reasoning inside <think>, then the boxed answer."""
        reasoning = "\n".join(self.steps)
        return f"<think>\n{reasoning}\n</think>\n\nThe answer is $\\boxed{{{self.answer}}}$."

    def r1_guess(self, answer: str) -> str:
        """A completion that skips the reasoning and states `answer` (a quick guess, right or wrong)."""
        return f"<think>\n{GUESS_OPENING} {answer}.\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."

    def as_record(self) -> dict[str, str]:
        return {"problem": self.problem, "answer": self.answer, "source": f"synthetic/{self.kind}/{self.level}"}


def latex(x: sympy.Rational | int) -> str:
    """Gold-answer spelling: integers plainly, fractions as \\frac{p}{q} with the sign in front."""
    x = sympy.Rational(x)
    if x.q == 1:
        return str(x.p)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.p)}}}{{{x.q}}}"


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A nearby wrong answer spelt like `answer` (integer, decimal or \\frac): off by 1 to 3 units of
    its last digit, or of its numerator."""
    offset = rng.choice((-3, -2, -1, 1, 2, 3))
    frac = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if frac:
        value = sympy.Rational(int(frac[2]) * (-1 if frac[1] else 1) + offset, int(frac[3]))
        return latex(value)
    try:
        value = decimal.Decimal(answer)
    except decimal.InvalidOperation:
        raise ValueError(f"cannot perturb the answer {answer!r}") from None
    unit = decimal.Decimal(1).scaleb(value.as_tuple().exponent)
    return str(value + offset * unit)


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v != 0:
            return v


def _arithmetic(rng: random.Random, level: int) -> SyntheticProblem:
    hi = 10 ** min(level, 3)
    terms = [rng.randint(1, hi) for _ in range(level + 1)]
    ops = [rng.choice("+-*" if level > 1 else "+-") for _ in range(level)]
    expr = str(terms[0])
    for op, t in zip(ops, terms[1:]):
        expr += f" {op} {t}"
    value = sympy.sympify(expr)
    shown = expr.replace("*", "\\times")
    steps = (f"I need to evaluate {shown}.", "Multiplication comes before addition and subtraction.",
             f"Working it out gives {value}.")
    return SyntheticProblem(f"Compute ${shown}$.", latex(value), "arithmetic", level, steps)


def _fractions(rng: random.Random, level: int) -> SyntheticProblem:
    hi = 3 + 3 * level
    fracs = [sympy.Rational(_nonzero(rng, -hi, hi), rng.randint(2, hi)) for _ in range(1 + (level + 1) // 2)]
    ops = [rng.choice("+-" if level < 3 else "+-*") for _ in fracs[1:]]
    value = fracs[0]
    text = latex(fracs[0])
    for k, (op, f) in enumerate(zip(ops, fracs[1:])):
        term = f"\\left({latex(f)}\\right)" if f < 0 else latex(f)
        if op == "*":
            value *= f
            text = (f"\\left({text}\\right)" if k > 0 else text) + " \\cdot " + term
        else:
            value = value + f if op == "+" else value - f
            text += f" {op} {term}"
    steps = (f"Put everything over a common denominator in ${text}$.",
             f"Simplifying, the result is ${latex(value)}$.")
    return SyntheticProblem(f"Compute ${text}$ and write the result as a reduced fraction.",
                            latex(value), "fractions", level, steps)


def _linear(rng: random.Random, level: int) -> SyntheticProblem:
    x = sympy.Symbol("x")
    hi = 4 * level + 5
    a, c = _nonzero(rng, -hi, hi), rng.randint(-hi, hi)
    while a == c:
        c = rng.randint(-hi, hi)
    den = 1 if level <= 2 else rng.randint(1, 5)
    root = sympy.Rational(rng.randint(-hi, hi), den)
    b = rng.randint(-hi, hi)
    d = a * root + b - c * root
    lhs, rhs = a * x + b, c * x + d
    sol = sympy.solve(sympy.Eq(lhs, rhs), x)[0]
    steps = (f"Move the x terms to one side: {sympy.sstr(sympy.expand(lhs - rhs))} = 0.",
             f"So x = {sympy.sstr(sol)}.")
    return SyntheticProblem(f"Solve for $x$: ${sympy.latex(lhs)} = {sympy.latex(rhs)}$.",
                            latex(sol), "linear", level, steps)


def _percent(rng: random.Random, level: int) -> SyntheticProblem:
    p = rng.choice([5, 10, 20, 25, 50, 75]) if level <= 2 else rng.randint(1, 99)
    n = rng.randint(1, 20 * level) * (20 if level <= 3 else 1)
    shown = str(decimal.Decimal(p * n) / 100)
    steps = (f"{p}% of {n} is {p}/100 times {n}.", f"That equals {shown}.")
    return SyntheticProblem(f"What is ${p}\\%$ of ${n}$?", shown, "percent", level, steps)


def _modular(rng: random.Random, level: int) -> SyntheticProblem:
    base, exp, mod = rng.randint(2, 9 + level), rng.randint(2, 5 * level * level), rng.randint(3, 7 + 4 * level)
    value = pow(base, exp, mod)
    steps = (f"Compute {base}^{exp} modulo {mod} by repeated squaring.", f"The remainder is {value}.")
    return SyntheticProblem(f"What is the remainder when ${base}^{{{exp}}}$ is divided by ${mod}$?",
                            str(value), "modular", level, steps)


def _quadratic(rng: random.Random, level: int) -> SyntheticProblem:
    x = sympy.Symbol("x")
    hi = 3 + 2 * level
    r1, r2 = rng.randint(-hi, hi), rng.randint(-hi, hi)
    lead = rng.randint(1, level)
    poly = sympy.expand(lead * (x - r1) * (x - r2))
    ask = rng.choice(["larger root", "sum of the roots", "product of the roots"])
    value = {"larger root": max(r1, r2), "sum of the roots": r1 + r2, "product of the roots": r1 * r2}[ask]
    steps = (f"Factor: {sympy.sstr(poly)} = {sympy.sstr(sympy.factor(poly))}.", f"The roots are {r1} and {r2}.",
             f"The {ask} is {value}.")
    return SyntheticProblem(f"Find the {ask} of ${sympy.latex(poly)} = 0$.", latex(value), "quadratic", level, steps)


_GENERATORS: dict[str, Callable[[random.Random, int], SyntheticProblem]] = {
    "arithmetic": _arithmetic, "fractions": _fractions, "linear": _linear,
    "percent": _percent, "modular": _modular, "quadratic": _quadratic,
}


def make_problem(
    seed: int, index: int, kinds: Sequence[str] = KINDS, levels: Sequence[int] = LEVELS
) -> SyntheticProblem:
    """Problem number `index` of the stream defined by `seed`: the same arguments give the same problem."""
    for k in kinds:
        if k not in _GENERATORS:
            raise ValueError(f"unknown synthetic kind {k!r}; expected one of {KINDS}")
    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"synthetic level must be in {LEVELS}, got {lv}")
    rng = random.Random(f"{seed}:{index}")
    kind = kinds[rng.randrange(len(kinds))]
    level = levels[rng.randrange(len(levels))]
    return _GENERATORS[kind](rng, level)


def generate(
    n: int, seed: int = 0, kinds: Sequence[str] = KINDS, levels: Sequence[int] = LEVELS
) -> list[SyntheticProblem]:
    """The first `n` problems of the stream defined by `seed`."""
    return [make_problem(seed, i, kinds, levels) for i in range(n)]


class SyntheticSource:
    """Random-access source of problem records (`problem`, `answer`, `source`) for grain pipelines."""

    def __init__(self, size: int, seed: int = 0, kinds: Sequence[str] = KINDS, levels: Sequence[int] = LEVELS):
        self.size, self.seed, self.kinds, self.levels = size, seed, tuple(kinds), tuple(levels)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, str]:
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticSource index {index} out of range [0, {self.size})")
        return make_problem(self.seed, index, self.kinds, self.levels).as_record()
