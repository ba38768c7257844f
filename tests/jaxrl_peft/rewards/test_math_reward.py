"""Math reward: extraction, verification against gold answers, and bounded time on hostile input."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from jaxrl_peft.rewards import math as math_lib
from jaxrl_peft.rewards.math import MathRewardPool, extract_answer, hostile_reason, math_reward

DEADLINE_S = 2.0
# Bound on one hostile call: the deadline plus scheduling slack on a busy 2-core machine.
BOUND_S = DEADLINE_S + 2.0


@pytest.fixture(scope="module")
def pool():
    with MathRewardPool(workers=2, deadline_s=DEADLINE_S) as p:
        yield p


def r1(answer_text: str, think: str = "Let me work this out carefully.") -> str:
    return f"<think>\n{think}\n</think>\n\n{answer_text}"


# (completion, gold, expected reward)
CASES = [
    # boxed integers and the R1 structure
    (r1("The answer is $\\boxed{204}$."), "204", 1.0),
    (r1("So $\\boxed{205}$."), "204", 0.0),
    ("<think>maybe \\boxed{7}</think> Final: \\boxed{8}", "8", 1.0),
    ("<think>maybe \\boxed{8}</think> Final: \\boxed{7}", "8", 0.0),
    (r1("First \\boxed{3}, but on reflection \\boxed{4}."), "4", 1.0),
    (r1("\\boxed{ 42 }"), "42", 1.0),
    (r1("\\fbox{12}"), "12", 1.0),
    (r1("$\\boxed 5$"), "5", 1.0),
    ("No think tags at all, the result is \\boxed{9}.", "9", 1.0),
    ("<think>I am still thinking and \\boxed{9} might be it", "9", 1.0),
    (r1("\\boxed{-3}"), "-3", 1.0),
    (r1("\\boxed{3}"), "-3", 0.0),
    (r1("\\boxed{1,000}"), "1000", 1.0),
    (r1("\\boxed{070}"), "70", 1.0),
    # no answer at all
    (r1("I could not solve it."), "1", 0.0),
    ("", "1", 0.0),
    (r1("\\boxed{}"), "1", 0.0),
    # Answer: lines (DAPO format)
    (r1("Some work.\nAnswer: 42"), "42", 1.0),
    (r1("Some work.\nAnswer: $\\frac{3}{4}$"), "\\frac{3}{4}", 1.0),
    (r1("Some work.\n**Answer:** 17."), "17", 1.0),
    (r1("Some work.\nFinal Answer: 0.25"), "\\frac14", 1.0),
    (r1("Answer: 41"), "42", 0.0),
    (r1("Answer: 10\nwait, no.\nAnswer: 12"), "12", 1.0),
    (r1("\\boxed{5}\nAnswer: 6"), "5", 1.0),
    # fractions
    (r1("\\boxed{\\frac{1}{2}}"), "\\frac{1}{2}", 1.0),
    (r1("\\boxed{\\dfrac{1}{2}}"), "\\frac{1}{2}", 1.0),
    (r1("\\boxed{\\frac12}"), "\\frac{1}{2}", 1.0),
    (r1("\\boxed{1/2}"), "\\frac{1}{2}", 1.0),
    (r1("\\boxed{\\tfrac{2}{4}}"), "\\frac{1}{2}", 1.0),
    (r1("\\boxed{\\frac{2}{3}}"), "\\frac{1}{2}", 0.0),
    (r1("\\boxed{-\\frac{7}{2}}"), "-3.5", 1.0),
    (r1("\\boxed{\\frac{7}{2}}"), "-\\frac{7}{2}", 0.0),
    # decimals
    (r1("\\boxed{0.5}"), "\\frac{1}{2}", 1.0),
    (r1("\\boxed{3.0}"), "3", 1.0),
    (r1("\\boxed{2.50}"), "2.5", 1.0),
    (r1("\\boxed{0.3333}"), "\\frac{1}{3}", 0.0),
    (r1("\\boxed{4.5 \\times 10^{33}}"), "4.5e33", 1.0),
    (r1("\\boxed{20.39}"), "20.4", 0.0),
    # LaTeX variants
    (r1("\\boxed{\\sqrt{2}/2}"), "\\frac{\\sqrt{2}}{2}", 1.0),
    (r1("\\boxed{\\frac{\\sqrt2}{2}}"), "\\frac{\\sqrt{2}}{2}", 1.0),
    (r1("\\boxed{2\\sqrt{3}}"), "\\sqrt{12}", 1.0),
    (r1("\\boxed{3\\sqrt{2}}"), "\\sqrt{12}", 0.0),
    (r1("\\boxed{\\pi}"), "\\pi", 1.0),
    (r1("\\boxed{3.14}"), "\\pi", 0.0),
    (r1("\\boxed{(x+2)(x+5)}"), "x^2+7x+10", 1.0),
    (r1("\\boxed{x^2+7x+11}"), "x^2+7x+10", 0.0),
    (r1("\\boxed{x = 5}"), "5", 1.0),
    (r1("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}"), "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    (r1("\\boxed{\\text{(C)}}"), "\\text{(C)}", 1.0),
    (r1("\\boxed{C}"), "\\text{(C)}", 1.0),
    (r1("\\boxed{D}"), "\\text{(C)}", 0.0),
    (r1("\\boxed{\\infty}"), "\\infty", 1.0),
    # intervals and tuples
    (r1("\\boxed{[-2, 7]}"), "[-2,7]", 1.0),
    (r1("\\boxed{(-2, 7)}"), "[-2,7]", 0.0),
    (r1("\\boxed{(-\\infty, 3]}"), "(-\\infty,3]", 1.0),
    (r1("\\boxed{(-\\infty, 3)}"), "(-\\infty,3]", 0.0),
    (r1("\\boxed{(3, -1)}"), "(3,-1)", 1.0),
    (r1("\\boxed{(-1, 3)}"), "(3,-1)", 0.0),
    (r1("\\boxed{\\{1, 2\\}}"), "1, 2", 1.0),
    # units, currency, degrees
    (r1("\\boxed{10 \\text{ cm}}"), "10", 1.0),
    (r1("\\boxed{10}"), "10\\text{ cm}", 1.0),
    (r1("\\boxed{\\$18.90}"), "18.90", 1.0),
    (r1("\\boxed{90^\\circ}"), "90", 1.0),
    (r1("\\boxed{45^\\circ}"), "90", 0.0),
    # percentages
    (r1("\\boxed{50\\%}"), "50\\%", 1.0),
    (r1("\\boxed{50}"), "50\\%", 1.0),
    (r1("\\boxed{0.5}"), "50\\%", 1.0),
    (r1("\\boxed{25\\%}"), "50\\%", 0.0),
    # wrong answers that look right
    (r1("\\boxed{204.5}"), "204", 0.0),
    (r1("\\boxed{2040}"), "204", 0.0),
    (r1("The answer is 204 but I box \\boxed{203}"), "204", 0.0),
    (r1("\\boxed{\\frac{1}{2}}"), "0.51", 0.0),
    (r1("\\boxed{x = 6}"), "5", 0.0),
    # issue 14: LaTeX row breaks followed by a space
    (r1("\\boxed{\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0),
    (r1("\\boxed{\\begin{pmatrix}1 & 2 \\\\ 3 & 5\\end{pmatrix}}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 0.0),
    (r1("\\boxed{\\begin{pmatrix} 3 \\\\ -1 \\end{pmatrix}}"), "\\begin{pmatrix}3\\\\-1\\end{pmatrix}", 1.0),
    # answers in several boxes are joined; words between boxes keep only the last
    (r1("$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$"), "(2, 2), (6, 2)", 1.0),
    (r1("\\boxed{1}, \\boxed{2} and \\boxed{3}"), "1, 2, 3", 1.0),
    (r1("\\boxed{1}, \\boxed{2} and \\boxed{3}"), "3", 0.0),
    (r1("\\(y_1 = \\boxed{2x} \\) and \\( y_2 = \\boxed{3x} \\)"), "y_1 = 2x, y_2 = 3x", 1.0),
    (r1("I first got \\boxed{3}, which is wrong; so \\boxed{4}."), "4", 1.0),
    # a comma followed by a space separates items; without the space it groups thousands
    (r1("is $\\boxed{32, 349}$"), "32349", 0.0),
    (r1("is $\\boxed{32,349}$"), "32349", 1.0),
    (r1("is $\\boxed{32,\\! 349}$"), "32349", 1.0),
    (r1("The final answer is $14{,}916$. I hope it is correct."), "14916", 1.0),
    # Answer: lines keep the answer, not the sentence
    (r1("Final Answer: The largest $n$ is 34."), "34", 1.0),
    (r1("Final Answer: The largest $n$ is 35."), "34", 0.0),
    # answers after an anchor in prose (math-verify's anchors)
    (r1("so \\boxed{200} and \\boxed{255} in between. Final Answer: The final answer is $10,455$. I hope it is correct."),
     "10455", 1.0),
    (r1("Answer \\[ 9 \\]"), "9", 1.0),
    (r1("Answer $ \\frac{1}{2} \\$ = \\frac{10}{9} $"), "10/9", 1.0),
    (r1("The final answer, after all this, is $x \\geq 5$"), "x \\geq 5", 1.0),
    (r1("The final answer, after all this, is $x \\geq 6$"), "x \\geq 5", 0.0),
    # a worked solution as gold is read the way the study reads it
    (r1("\\boxed{28\\%}"), "so the loss is $\\boxed{28\\%}$ in all.", 1.0),
    (r1("\\boxed{27\\%}"), "so the loss is $\\boxed{28\\%}$ in all.", 0.0),
    (r1("\\boxed{1.22}"), "1,22", 1.0),
    # strings as code are never run
    (r1("\\boxed{__import__('os').system('false')}"), "0", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", CASES, ids=[f"case{k}" for k in range(len(CASES))])
def test_case(pool, completion, gold, expected):
    assert pool([completion], [gold]) == [expected]


def test_batch_matches_single_cases(pool):
    completions, golds, expected = zip(*CASES)
    assert pool(list(completions), list(golds)) == list(expected)


def test_extract_answer():
    assert extract_answer(r1("\\boxed{\\frac{a}{\\sqrt{b}}}")) == "\\frac{a}{\\sqrt{b}}"
    assert extract_answer("<think>\\boxed{1}</think> nothing here") is None
    assert extract_answer(r1("x \\boxed{\\{1,2\\}} y")) == "\\{1,2\\}"
    assert extract_answer(r1("Answer: $\\boxed{7}$")) == "7"
    assert extract_answer(r1("\\boxed{2} and then a cut-off \\boxed{3")) == "2"
    assert extract_answer(None) is None


_rng = random.Random(0)
HOSTILE = {
    "tower": "\\boxed{9^{9^{9^{9}}}}",
    "tower_plain": "Answer: 9^9^9^9",
    "tower_python": "Answer: 9**9**9**9",
    "huge_power_parens": "\\boxed{(9^{99999})^{99999}}",
    "huge_exponent": "\\boxed{2^{123456789}}",
    "factorial_literal": "\\boxed{100000!}",
    "factorial_nested": "\\boxed{((10^{3})!)!}",
    "factorial_power": "\\boxed{(10^{7})!}",
    "sum_huge": "\\boxed{\\sum_{n=1}^{10^{12}} n^{n}}",
    "deep_braces": "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
    "deep_parens": "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
    "unclosed_box": "\\boxed{" + "{" * 100000,
    "long_answer": "\\boxed{" + "1+" * 5000 + "1}",
    "megabyte_text": "a" * 2_000_000 + "\\boxed{1}",
    "megabyte_boxes": "\\boxed{1}" * 200_000,
    "binary_junk": bytes(_rng.randrange(256) for _ in range(200_000)).decode("latin-1"),
    "nul_bytes": "\\boxed{1\x00\x00}",
    "unclosed_anchored_envs": "answer \\( x" * 20000,
    "many_final_answers": "final answer " + "is \\[ " * 20000,
    "raw_bytes": b"\\boxed{\xff\xfe1}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_bounded(pool, name):
    gold = "1" if name in ("megabyte_text", "megabyte_boxes") else "7"
    t0 = time.monotonic()
    reward = pool([HOSTILE[name]], [gold])
    elapsed = time.monotonic() - t0
    assert elapsed < BOUND_S, f"{name} took {elapsed:.2f}s"
    assert reward == [1.0 if gold == "1" else 0.0]
    assert pool([r1("\\boxed{12}")], ["12"]) == [1.0]


def test_hostile_batch_is_bounded(pool):
    junk = list(HOSTILE.values()) + [r1(f"\\boxed{{{k}}}") for k in range(40)]
    golds = ["7"] * len(HOSTILE) + [str(k) for k in range(40)]
    t0 = time.monotonic()
    rewards = pool(junk, golds)
    assert time.monotonic() - t0 < 2 * BOUND_S
    assert rewards[len(HOSTILE):] == [1.0] * 40


def test_prefilter_refuses_without_sympy():
    for answer in ("9^9^9^9", "10^{10^{10}}", "123456!", "(" * 40 + ")" * 40, "x" * 5000, "1\x00"):
        assert hostile_reason(answer) is not None, answer
    for answer in ("2^{2023}", "\\frac{1}{2}", "e^{x}", "10!", "(1, 2)", "x^{2}+1"):
        assert hostile_reason(answer) is None, answer


def test_hung_worker_is_killed_and_replaced():
    # A stopped worker cannot answer nor handle its own alarm: only the parent's deadline frees it.
    with MathRewardPool(workers=1, deadline_s=1.0) as p:
        assert p.verify_pairs([("1", "1")]) == [1.0]
        victim = p._workers[0].proc
        os.kill(victim.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert p.verify_pairs([("2", "2")]) == [0.0]
        assert time.monotonic() - t0 < 1.0 + 1.5
        assert victim.poll() is not None
        assert p.stats["timed_out"] == 1
        assert p.verify_pairs([("3", "3")]) == [1.0]


def test_crashed_worker_is_replaced():
    with MathRewardPool(workers=1, deadline_s=2.0) as p:
        assert p.verify_pairs([("1", "1")]) == [1.0]
        os.kill(p._workers[0].proc.pid, signal.SIGKILL)
        p._workers[0].proc.wait()
        assert p.verify_pairs([("1", "1"), ("2", "3")]) == [1.0, 0.0]


def test_workers_are_recycled():
    with MathRewardPool(workers=1, max_tasks_per_worker=3) as p:
        assert p.verify_pairs([(str(k), str(k)) for k in range(8)]) == [1.0] * 8
        assert p.stats["recycled"] >= 2


def test_close_stops_workers():
    p = MathRewardPool(workers=2)
    p.verify_pairs([("1", "1"), ("2", "2")])
    procs = [w.proc for w in p._workers]
    p.close()
    assert all(proc.poll() is not None for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p([r1("\\boxed{1}")], ["2"])


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="completions has 2 items but gold_answers has 1"):
        math_reward(["a", "b"], ["1"])


def test_module_level_math_reward():
    assert math_reward([r1("\\boxed{\\frac{6}{4}}"), r1("\\boxed{2}")], ["1.5", "3"]) == [1.0, 0.0]


def test_workers_never_import_jax(pool):
    pid = pool._workers[0].proc.pid
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    assert "jaxlib" not in maps


def test_a_worker_that_never_starts_is_replaced(monkeypatch):
    """A worker silent past the start-up timeout (seen once on a loaded machine) is replaced; scoring goes on."""
    real_init = math_lib._Worker.__init__
    spawned = []

    def init(self, memory_limit_mb, max_tasks):
        real_init(self, memory_limit_mb, max_tasks)
        spawned.append(self)
        if len(spawned) == 1:  # the first worker hangs before saying it is ready
            self.proc.kill()
            self.proc.wait()
            self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.fd = self.proc.stdout.fileno()

    monkeypatch.setattr(math_lib._Worker, "__init__", init)
    with math_lib.MathRewardPool(workers=2, startup_timeout_s=3.0) as pool:
        assert pool(["\\boxed{x^2+1}"] * 6, ["1+x^2"] * 6) == [1.0] * 6
        deadline, k = time.monotonic() + 30, 3
        while pool.stats["slow_start"] == 0 and time.monotonic() < deadline:
            k += 1  # a new pair each time: answers are cached
            assert pool([f"\\boxed{{x^{k}+1}}"], [f"1+x^{k}"]) == [1.0]
            time.sleep(0.5)
        assert pool.stats["slow_start"] == 1
