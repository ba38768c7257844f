"""Reruns from a run's record: the same config gives identical metrics; a changed seed differs at step 1."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from configs.grpo_lora import get_config
from jaxrl_peft.rl import grpo
from jaxrl_peft.train import loop, rerun

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(steps: int = 3):
    """The embedded default shrunk to seconds; 48 new tokens so that some completions are rewarded."""
    c = get_config("tiny")
    c.steps = steps
    c.rl.update(prompts_per_step=2, group_size=4, max_new_tokens=48, micro_batch_size=8)
    c.eval.update(num_problems=2, samples=1, batch_size=8)
    c.reward_workers = 1
    return c


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("run")
    c = tiny_config()
    loop.train(grpo.GRPOTask(c), c, workdir)
    return workdir


def test_rerun_of_a_recorded_run_is_identical(recorded_run, tmp_path):
    lines = []
    result = rerun.rerun(recorded_run, workdir=tmp_path / "again", log=lines.append)
    assert result.line() == "rerun: identical (3 steps)", result.line()
    assert [line for line in lines if "uncommitted" not in line] == []  # same code, packages and devices
    recorded = rerun.read_metrics(recorded_run)
    assert [r["step"] for r in recorded] == [1, 2, 3]
    assert any(r["grad_norm"] > 0 for r in recorded)  # the adapter moved: identity covers the updates too
    again = rerun.read_metrics(tmp_path / "again")
    assert [r["entropy"] for r in again] == [r["entropy"] for r in recorded]
    assert any(r["time_step"] != s["time_step"] for r, s in zip(recorded, again))  # timings were skipped


def test_a_changed_seed_differs_at_the_first_step(recorded_run, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("metrics.jsonl", "run.json"):
        shutil.copy(recorded_run / name, changed / name)
    config = json.loads((recorded_run / "config.json").read_text())
    config["seed"] = 43
    (changed / "config.json").write_text(json.dumps(config))
    lines = []
    result = rerun.rerun(changed, steps=1, log=lines.append)
    assert not result.identical and result.step == 1, result.line()
    assert result.line().startswith("rerun: differs at step 1: ")
    assert (changed / "rerun-1" / "metrics.jsonl").exists()


def test_compare_and_record_warnings_on_constructed_streams():
    a = [{"step": 1, "loss": 0.5, "time_step": 1.0, "tokens_per_s": 9.0}, {"step": 2, "loss": 0.25}]
    b = [{"step": 1, "loss": 0.5, "time_step": 2.0, "tokens_per_s": 3.0}, {"step": 2, "loss": 0.3}]
    assert rerun.compare_metrics(a, b, 1).line() == "rerun: identical (1 steps)"
    assert rerun.compare_metrics(a, b, 2).line() == "rerun: differs at step 2: loss 0.25 vs 0.3"
    assert rerun.compare_metrics(a, b[:1], 2).step == 2
    assert rerun.compare_metrics(a, [{"step": 1, "loss": 0.5, "kl": 0.0}], 1).metric == "kl"
    record = {"git_commit": "abc", "git_dirty": False, "packages": {"jax": "0.1"}, "devices": {"count": 1}}
    now = {"git_commit": "def", "git_dirty": False, "packages": {"jax": "0.2"}, "devices": {"count": 1}}
    warnings = rerun.record_warnings(record, now)
    assert warnings == ["warning: git_commit: recorded abc, now def", "warning: package jax: recorded 0.1, now 0.2"]
    assert rerun.record_warnings(record, record) == []


def test_config_lists_become_tuples(recorded_run):
    c = rerun.load_config(recorded_run)
    assert isinstance(c.peft.hparams.target_modules, tuple) and isinstance(c.data.synthetic_kinds, tuple)
    assert json.loads(c.to_json_best_effort()) == json.loads((recorded_run / "config.json").read_text())


@pytest.mark.slow
def test_launch_rerun_prints_the_verdict_last(recorded_run, tmp_path):
    proc = subprocess.run([sys.executable, "launch/rerun.py", str(recorded_run), "--steps=1",
                           f"--workdir={tmp_path / 'cli'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "rerun: identical (1 steps)"
    bad = subprocess.run([sys.executable, "launch/rerun.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
