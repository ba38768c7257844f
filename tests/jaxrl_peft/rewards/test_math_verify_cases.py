"""The math reward on Math-Verify's own test cases, written as R1 completions.

Origin: huggingface/Math-Verify, tests/ (test_all, test_boxed, test_numina_cases, test_open_thoughts,
test_strict, test_yujianll), commit 5d148cfaaf99214c2e4ffb4bc497ab042c592a7a, MIT licence; regenerate
math_verify_cases.json with make_math_verify_cases.py. Each case carries the verdict Math-Verify's
authors expect and `study_verdict`, what the study's reward (math-verify, rlvr_paper.md section 4) gives
the same completion. Ours must give the expected verdict wherever the study's does, and never score a
case expected wrong as right.
"""

import json
import os

import pytest
from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

from jaxrl_peft.rewards.math import MathRewardPool

_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_verify_cases.json")
with open(_FIXTURE, encoding="utf-8") as _f:
    _DATA = json.load(_f)
CASES = _DATA["cases"]

# Cases the study's reward gets wrong and ours gets right (index into CASES: why).
OURS_RIGHT_STUDY_WRONG = {
    13: "prose with a currency unit, boxed: '1,000.99' is found",
    14: "the same case again in test_all",
    15: "prose with m², boxed: '1,000.99' is found",
    16: "prose with m², boxed",
    36: "`\\frac13 ` (fraction without braces) equals 1/3",
    37: "`\\frac3{3}` equals 1",
    38: "`\\sqrt3` equals \\sqrt{3}",
    84: "`\\tfrac12` inside a union of intervals",
    85: "`\\sqrt 2+\\sqrt 5` (sqrt without braces)",
    86: "`\\frac94\\pi`",
    141: "a bare prose answer ending in `P(A) = 2/3`",
    159: "`Final Answer: The largest $n$ is 34.` (the study takes `$n$`)",
}


@pytest.fixture(scope="module")
def our_verdicts():
    # A generous deadline: this checks answers, not time (2 shared cores; the deadline has its own tests).
    with MathRewardPool(workers=2, deadline_s=10.0) as pool:
        return pool([c["completion"] for c in CASES], [c["gold"] for c in CASES])


def _describe(indices):
    return "\n".join(f"#{k} {CASES[k]['file']}::{CASES[k]['test']} gold={CASES[k]['gold'][:80]!r} "
                     f"pred={CASES[k]['pred'][:80]!r} expected={CASES[k]['expected']}" for k in indices)


def test_fixture_names_its_origin():
    assert _DATA["origin"]["repo"] == "huggingface/Math-Verify"
    assert len(_DATA["origin"]["commit"]) == 40
    assert len(CASES) == 266
    assert {c["expected"] for c in CASES} == {0, 1}


def test_right_wherever_the_study_reward_is_right(our_verdicts):
    wrong = [k for k, c in enumerate(CASES)
             if c["study_verdict"] == c["expected"] and our_verdicts[k] != c["expected"]]
    assert not wrong, "study right, ours wrong:\n" + _describe(wrong)


def test_no_case_expected_wrong_is_scored_right(our_verdicts):
    false_positives = [k for k, c in enumerate(CASES) if c["expected"] == 0 and our_verdicts[k] != 0.0]
    assert not false_positives, _describe(false_positives)


def test_cases_where_ours_beats_the_study(our_verdicts):
    for k in OURS_RIGHT_STUDY_WRONG:
        assert CASES[k]["study_verdict"] != CASES[k]["expected"], k
        assert our_verdicts[k] == CASES[k]["expected"], _describe([k])
    ours = sum(v == c["expected"] for v, c in zip(our_verdicts, CASES))
    study = sum(c["study_verdict"] == c["expected"] for c in CASES)
    assert (study, ours) == (224, 236)


@pytest.mark.slow
def test_stored_study_verdicts_are_math_verify_today():
    config = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                    try_extract_without_anchor=False)]
    for k, c in enumerate(CASES):
        gold = parse(c["gold"])
        if gold:
            verdict = int(verify(gold, parse(c["completion"], extraction_config=config, extraction_mode="first_match")))
        else:
            verdict = int(c["completion"].strip().lower() == c["gold"].strip().lower())
        assert verdict == c["study_verdict"], _describe([k])
