"""Synthetic problems: deterministic, graded, and their answers verify with the math reward."""

import pytest
import sympy

from jaxrl_peft.data.synthetic import (GUESS_OPENING, KINDS, LEVELS, SyntheticSource, generate, make_problem,
                                      wrong_answer)
from jaxrl_peft.rewards.math import math_reward


def test_deterministic_and_random_access():
    a, b = generate(30, seed=7), generate(30, seed=7)
    assert a == b
    assert make_problem(7, 12) == a[12]
    assert generate(30, seed=8) != a
    src = SyntheticSource(30, seed=7)
    assert len(src) == 30 and src[5] == a[5].as_record()
    with pytest.raises(IndexError):
        src[30]


def test_kinds_and_levels_are_covered():
    problems = generate(400, seed=0)
    assert {p.kind for p in problems} == set(KINDS)
    assert {p.level for p in problems} == set(LEVELS)
    assert all(p.level == 1 for p in generate(20, seed=0, levels=[1]))
    with pytest.raises(ValueError, match="unknown synthetic kind 'calculus'"):
        make_problem(0, 0, kinds=["calculus"])


def test_r1_solutions_earn_reward_and_wrong_answers_do_not():
    problems = generate(120, seed=3)
    solutions = [p.r1_solution() for p in problems]
    assert all(s.startswith("<think>\n") and "</think>" in s for s in solutions)
    golds = [p.answer for p in problems]
    assert math_reward(solutions, golds) == [1.0] * len(problems)
    wrong = [f"<think>\n</think>\n\\boxed{{{p.answer}+1}}" for p in problems]
    assert math_reward(wrong, golds) == [0.0] * len(problems)


def test_guesses_are_graded_like_any_answer():
    import random

    rng = random.Random(0)
    problems = generate(200, seed=4)
    golds = [p.answer for p in problems]
    wrong = [wrong_answer(g, rng) for g in golds]
    assert all(w != g for w, g in zip(wrong, golds))
    assert math_reward([p.r1_guess(p.answer) for p in problems], golds) == [1.0] * len(problems)
    assert math_reward([p.r1_guess(w) for p, w in zip(problems, wrong)], golds) == [0.0] * len(problems)
    assert all(p.r1_guess("7").startswith("<think>\n" + GUESS_OPENING) for p in problems)
    assert wrong_answer("7.5", random.Random(1)) in {"7.2", "7.3", "7.4", "7.6", "7.7", "7.8"}
    assert wrong_answer("\\frac{3}{4}", random.Random(1)) in {"0", "\\frac{1}{4}", "\\frac{1}{2}", "1",
                                                              "\\frac{5}{4}", "\\frac{3}{2}"}
    with pytest.raises(ValueError, match="cannot perturb"):
        wrong_answer("x + 1", rng)


def test_answers_are_correct_by_construction():
    import re
    from decimal import Decimal

    for p in generate(300, seed=5):
        if p.kind == "arithmetic":
            expr = p.problem.split("$")[1].replace("\\times", "*")
            assert sympy.sympify(expr) == sympy.sympify(p.answer), p
        elif p.kind == "modular":
            base, exp, mod = map(int, re.findall(r"\d+", p.problem))
            assert pow(base, exp, mod) == int(p.answer), p
        elif p.kind == "percent":
            pct, n = map(int, re.findall(r"\d+", p.problem))
            assert Decimal(pct * n) / 100 == Decimal(p.answer), p
