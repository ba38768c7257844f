"""launch/make_tiny_model.py: the imperfect teacher's demonstrations and an end-to-end build of a model."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxrl_peft.data import synthetic
from jaxrl_peft.models import hf
from jaxrl_peft.rewards.math import math_reward

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "launch" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demonstrations_guess_at_the_configured_rate_and_accuracy():
    problems = synthetic.generate(4000, seed=0, kinds=("percent", "quadratic", "modular", "linear"), levels=(1, 2))
    texts = _script().demonstrations(problems, guess_fraction=0.6, guess_accuracy=0.2, seed=0)
    guessed = np.array([t.startswith("<think>\n" + synthetic.GUESS_OPENING) for t in texts])
    correct = np.array(math_reward(texts, [p.answer for p in problems]))
    assert abs(guessed.mean() - 0.6) < 0.03
    assert abs(correct[guessed].mean() - 0.2) < 0.03
    assert correct[~guessed].all()  # worked solutions are always right
    assert texts == _script().demonstrations(problems, 0.6, 0.2, seed=0)  # deterministic
    assert texts != _script().demonstrations(problems, 0.6, 0.2, seed=1)
    assert all(t == p.r1_solution() for t, p in zip(_script().demonstrations(problems[:50], 0.0, 0.2, 0), problems))


def test_builds_a_loadable_r1_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "launch" / "make_tiny_model.py"), f"--out={out}",
                    "--train_problems=300", "--steps=3", "--batch_size=2", "--vocab_size=600", "--hidden_size=64",
                    "--intermediate_size=128", "--heldout_problems=4", "--skip_eval"],
                   check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    model, params = hf.load(out)
    tok = hf.Tokenizer(out)
    assert model.cfg.hidden_size == 64 and tok.vocab_size == 600
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.endswith("<｜Assistant｜><think>\n")
