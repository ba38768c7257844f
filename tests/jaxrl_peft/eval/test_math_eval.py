"""Evaluation end to end on a tiny random checkpoint: launch/eval.py, JSON consistency, batching
invariance, adapters, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import eval_math
from jaxrl_peft.data import prompts, synthetic
from jaxrl_peft.eval import math_eval, metrics
from jaxrl_peft.models import hf_peft, tiny
from jaxrl_peft.peft import registry
from jaxrl_peft.rl import rollout

REPO = Path(__file__).resolve().parents[3]
FILE_PROBLEMS = [{"problem": "What is $2 + 3$?", "answer": "5"},
                 {"problem": "Compute $\\frac{1}{2} + \\frac{1}{4}$.", "answer": "\\frac{3}{4}"},
                 {"problem": "Solve for $x$: $2x = 14$.", "answer": "7"}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny random R1-style checkpoint and a 3-problem jsonl benchmark."""
    root = tmp_path_factory.mktemp("eval")
    texts = [prompts.DAPO_PREFIX + p.problem + prompts.DAPO_SUFFIX + p.r1_solution()
             for p in synthetic.generate(64, seed=5)] + [p["problem"] for p in FILE_PROBLEMS]
    tiny.make_tiny_checkpoint(root / "ckpt", texts, seed=0, vocab_size=384)
    (root / "probs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in FILE_PROBLEMS))
    return root


def _config(workdir: Path, **overrides):
    c = eval_math.get_config("tiny")
    c.checkpoint = str(workdir / "ckpt")
    c.benchmarks = ("synthetic", str(workdir / "probs.jsonl"))
    c.limit = 4
    c.k.synthetic = 3
    c.default_k = 2
    c.sampling.max_new_tokens = 12
    c.prompt_bucket = 256  # one prompt width: one compilation
    c.batch_size = 8
    for key, value in overrides.items():
        c[key] = value
    return c


def _stub_scorer(completions, golds):
    """Deterministic mixed verdicts (a random model is never right), so the metrics are non-trivial."""
    return [float(len(c) % 3 == 0) for c in completions]


def test_launch_prints_table_and_writes_consistent_json(workdir):
    out = workdir / "results.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [sys.executable, str(REPO / "launch/eval.py"), f"--config={REPO / 'configs/eval_math.py'}:tiny",
           f"--checkpoint={workdir / 'ckpt'}", f"--output={out}",
           f"--config.benchmarks=('synthetic','{workdir / 'probs.jsonl'}')", "--config.limit=4",
           "--config.k.synthetic=3", "--config.default_k=2", "--config.sampling.max_new_tokens=12",
           "--config.prompt_bucket=256", "--config.batch_size=8"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| benchmark | problems | k | avg@k | pass@k | mean length | truncated |")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["synthetic", str(workdir / "probs.jsonl"),
                                                                 "**mean**"]
    assert "[eval] synthetic: problems 4/4" in proc.stderr  # progress on stderr

    data = json.loads(out.read_text())
    assert data["checkpoint"] == str(workdir / "ckpt") and data["adapter"] is None
    assert data["config"]["sampling"]["temperature"] == 0.7
    summary, problems = data["summary"], data["problems"]
    assert list(problems) == ["synthetic", str(workdir / "probs.jsonl")]
    for name, k in (("synthetic", 3), (str(workdir / "probs.jsonl"), 2)):
        rows = problems[name]
        assert len(rows) == (4 if name == "synthetic" else 3) == summary[name]["n_problems"]
        assert summary[name]["k"] == k
        for p in rows:
            assert len(p["answers"]) == len(p["correct"]) == len(p["lengths"]) == len(p["finished"]) == k
            assert all(1 <= n <= 12 for n in p["lengths"])
            assert all(f or n == 12 for f, n in zip(p["finished"], p["lengths"]))
        lengths = [n for p in rows for n in p["lengths"]]
        assert summary[name]["mean_length"] == pytest.approx(np.mean(lengths))
        assert summary[name]["truncation_rate"] == pytest.approx(np.mean([not f for p in rows for f in p["finished"]]))
        assert summary[name]["avg_at_k"] == pytest.approx(np.mean([np.mean(p["correct"]) for p in rows]))
        assert summary[name]["pass_at_k"] == pytest.approx(np.mean([any(p["correct"]) for p in rows]))
    assert [p["gold"] for p in problems[str(workdir / "probs.jsonl")]] == [p["answer"] for p in FILE_PROBLEMS]
    for key in math_eval.MEAN_KEYS:
        assert summary["mean"][key] == pytest.approx(np.mean([summary[n][key] for n in problems]))
    mean_row = table[-1].split("|")
    assert mean_row[4].strip() == f"{100 * summary['mean']['avg_at_k']:.1f}"


SAMPLING = rollout.SamplingConfig(12, temperature=0.7, top_p=0.9)
KW = dict(template="dapo", prompt_bucket=256, scorer=_stub_scorer, save_completions=True)


@pytest.fixture(scope="module")
def base_run(workdir):
    """(model, variables, tokenizer, benchmarks, results, progress lines) of the base model, batch size 8."""
    c = _config(workdir)
    model, variables, tok = math_eval.load_policy(c.checkpoint, param_dtype="float32")
    benchmarks = math_eval.load_benchmarks(c.benchmarks, c.limit, synthetic_cfg=c.synthetic)
    lines = []
    results = math_eval.evaluate(model, variables, tok, benchmarks, {"synthetic": 3, c.benchmarks[1]: 2}, SAMPLING,
                                 batch_size=8, log=lines.append, **KW)
    return model, variables, tok, benchmarks, results, lines


def test_metrics_match_per_problem_results_and_do_not_depend_on_batching(base_run):
    model, variables, tok, benchmarks, a, lines = base_run
    b = math_eval.evaluate(model, variables, tok, {"synthetic": benchmarks["synthetic"]}, 3, SAMPLING,
                           batch_size=5, log=None, **KW)
    assert any("problems 4/4" in line for line in lines)
    syn_a, syn_b = a.benchmarks["synthetic"].problems, b.benchmarks["synthetic"].problems
    assert [p.completions for p in syn_a] == [p.completions for p in syn_b]  # same RNG stream per row
    flags = [p.correct for p in syn_a]
    assert 0 < np.mean(flags) < 1  # the stub scorer gives mixed verdicts
    s = a.summary()["synthetic"]
    assert s["avg_at_k"] == pytest.approx(np.mean(flags))
    assert s["pass_at_k"] == pytest.approx(np.mean([any(f) for f in flags]))
    assert s["pass@2"] == pytest.approx(np.mean([metrics.pass_at_k(3, sum(f), 2) for f in flags]))
    for p in syn_a:
        assert p.correct == [len(t) % 3 == 0 for t in p.completions]
        assert all(tok.eos_token not in t for t in p.completions)  # the stop token is not scored
    assert a.generated_tokens == sum(sum(p.lengths) for bench in a.benchmarks.values() for p in bench.problems)
    assert "| **mean** | 7 |" in a.table()


def test_adapter_is_loaded_and_applied(workdir, base_run):
    _, variables, tok, benchmarks, base, _ = base_run
    method = registry.get("lora", r=2, alpha=4.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params, adapter = registry.init_adapter(method, jax.random.key(1), variables["params"])
    rng = np.random.default_rng(0)
    adapter = jax.tree.map(lambda x: np.asarray(x) + 0.5 * rng.standard_normal(x.shape, np.float32), adapter)
    hf_peft.save_adapter(workdir / "adapter", method, params, adapter)
    model_a, variables_a, _ = math_eval.load_policy(workdir / "ckpt", workdir / "adapter", param_dtype="float32")
    assert model_a.peft is not None and set(variables_a) == {"params", "adapter"}
    tuned = math_eval.evaluate(model_a, variables_a, tok, {"synthetic": benchmarks["synthetic"]}, 3, SAMPLING,
                               batch_size=8, log=None, **KW)
    assert [p.completions for p in base.benchmarks["synthetic"].problems] != \
        [p.completions for p in tuned.benchmarks["synthetic"].problems]


def test_clear_errors_for_bad_inputs(workdir, tmp_path):
    with pytest.raises(math_eval.InputError, match="unknown benchmark 'aime2024'"):
        math_eval.run(_config(workdir, benchmarks=("aime2024",)))
    with pytest.raises(math_eval.InputError, match="is not a directory"):
        math_eval.run(_config(workdir), checkpoint=str(tmp_path / "missing"))
    with pytest.raises(math_eval.InputError, match="missing config.json"):
        math_eval.run(_config(workdir), checkpoint=str(tmp_path))
    with pytest.raises(math_eval.InputError, match="unknown prompt template"):
        math_eval.run(_config(workdir, template="nope"))
    with pytest.raises(math_eval.InputError, match="no checkpoint"):
        math_eval.run(_config(workdir, checkpoint=""))
    with pytest.raises(ValueError, match="must be '' .* or 'tiny'"):
        eval_math.get_config("huge")


def test_study_protocol_config():
    c = eval_math.get_config("")
    assert tuple(c.benchmarks) == ("aime24", "aime25", "amc", "math500", "minerva", "olympiad")
    assert dict(c.k) == {"aime24": 32, "aime25": 32, "amc": 32, "math500": 4, "minerva": 4, "olympiad": 4}
    assert (c.sampling.temperature, c.sampling.top_p, c.sampling.max_new_tokens) == (0.7, 0.9, 31744)
    assert c.template == "dapo" and c.seed == 42 and c.limit == 0 and c.max_prompt_tokens == 1024
