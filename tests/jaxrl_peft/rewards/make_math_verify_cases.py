"""Regenerate math_verify_cases.json from a checkout of huggingface/Math-Verify's tests/ folder.

Usage: python tests/jaxrl_peft/rewards/make_math_verify_cases.py DIR_WITH_TEST_FILES COMMIT
Every (gold, pred, expected) case of a `compare_strings`/`verify(parse, parse)` test whose settings are
math-verify's defaults (strict, no set-relation comparison) is kept, with its file and test name, the
prediction written as an R1 completion (`as_completion`), and `study_verdict`: what the study's reward
gives it (math-verify on the whole completion with the settings of rlvr_paper.md section 4; gold parsed
with math-verify's defaults).
"""

from __future__ import annotations

import json
import os
import sys
import types

from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

SOURCE_FILES = ("test_all", "test_boxed", "test_numina_cases", "test_open_thoughts", "test_strict", "test_yujianll")


STUDY_PREDICTION_CONFIG = [
    LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                          try_extract_without_anchor=False)
]
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def as_completion(pred: str) -> str:
    """An R1 completion ending in the prediction; a bare expression (no box, at most one outer pair of
    math delimiters) is written boxed, as a model would."""
    body = pred.strip()
    bare = None
    if "\\boxed" not in body:
        for left, right in _DELIMITERS:
            if body.startswith(left) and body.endswith(right) and len(body) >= len(left) + len(right):
                inner = body[len(left) : len(body) - len(right)]
                bare = None if any(t in inner for t in ("$", "\\(", "\\[")) else inner.strip()
                break
        else:
            bare = None if any(t in body for t in ("$", "\\(", "\\[")) else body
    if bare is not None:
        body = f"$\\boxed{{{bare}}}$"
    return f"<think>\nLet me work this out.\n</think>\n\n{body}"


def study_verdict(completion: str, gold: str) -> int:
    """The study's accuracy reward (PeRL's accuracy_reward): 1 when math-verify finds them equal."""
    try:
        gold_parsed = parse(gold)
        if not gold_parsed:
            return int(completion.strip().lower() == gold.strip().lower())
        pred_parsed = parse(completion, extraction_config=STUDY_PREDICTION_CONFIG, extraction_mode="first_match")
        return int(verify(gold_parsed, pred_parsed))
    except Exception:  # noqa: BLE001 - the study scores any failure 0
        return 0


def collect(folder: str) -> list[dict]:
    """Run each test module with a recording stand-in for `pytest.mark.parametrize`."""
    records: list[dict] = []
    current: dict = {}

    def parametrize(argnames, argvalues, **_):
        names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)

        def decorate(fn):
            for values in argvalues:
                row = dict(zip(names, values))
                records.append({"file": current["file"], "test": fn.__name__, **row})
            return fn

        return decorate

    fake_pytest = types.SimpleNamespace(mark=types.SimpleNamespace(parametrize=parametrize), raises=None)
    sys.modules["pytest"] = fake_pytest
    package = types.ModuleType("tests")
    package.__path__ = []
    sys.modules["tests"] = package
    for name in SOURCE_FILES:
        current["file"] = f"tests/{name}.py"
        module = types.ModuleType(f"tests.{name}")
        with open(os.path.join(folder, f"{name}.py"), encoding="utf-8") as f:
            exec(compile(f.read(), current["file"], "exec"), module.__dict__)
        sys.modules[f"tests.{name}"] = module
    return records


def main() -> None:
    folder, commit = sys.argv[1], sys.argv[2]
    cases = []
    for rec in collect(folder):
        expected = rec.get("expected", rec.get("result"))
        if "gold" not in rec or "pred" not in rec or expected is None:
            continue
        if rec.get("strict", True) is not True or rec.get("allow_set_relation_comp", False):
            continue
        completion = as_completion(rec["pred"])
        cases.append({"file": rec["file"], "test": rec["test"], "gold": rec["gold"], "pred": rec["pred"],
                      "expected": int(expected), "completion": completion,
                      "study_verdict": study_verdict(completion, rec["gold"])})
    out = {
        "origin": {"repo": "huggingface/Math-Verify", "folder": "tests/", "commit": commit,
                   "license": "MIT (Copyright (c) 2024 The HuggingFace Team)"},
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_verify_cases.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"{len(cases)} cases -> {path}")


if __name__ == "__main__":
    main()
