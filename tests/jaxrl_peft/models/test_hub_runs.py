"""Hub ids in the commands a user runs, offline: a cached model id trains, the paper config dry-runs
with nothing cached, and an uncached id is one clear message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.rl import grpo
from test_hub import SHA_MAIN, cache_repo

from configs.grpo_lora import get_config

ROOT = Path(__file__).resolve().parents[3]
ASSET = ROOT / "assets" / "tiny-r1"


def _env(hf_home):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    env.pop("XLA_FLAGS", None)
    return env


def test_cached_hub_id_loads_like_the_local_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_repo(tmp_path / "hf" / "hub", "someone/tiny-r1",
                          {p.name: p.read_bytes() for p in ASSET.iterdir()}, SHA_MAIN)
    c = get_config("tiny")
    c.model.checkpoint = "someone/tiny-r1"
    c.reward_workers = 1
    task = grpo.GRPOTask(c)
    try:
        setup = task.setup(mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    finally:
        task.close()
    assert Path(task.data_files["model"]) == snapshot
    assert task.cfg.hidden_size == json.loads((ASSET / "config.json").read_text())["hidden_size"]
    assert jax.tree.leaves(setup.params)


def test_paper_config_dry_runs_offline_with_nothing_cached(tmp_path):
    out = subprocess.run([sys.executable, "launch/train.py", "--config=configs/grpo_dora.py", "--dry_run"],
                         cwd=ROOT, env=_env(tmp_path / "hf"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "total_params=1777088000" in out.stdout and "state_bytes_per_device=" in out.stdout


def test_uncached_id_is_one_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "launch/train.py", "--config=configs/grpo_dora.py",
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=_env(tmp_path / "hf"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in out.stderr and "hf download" in out.stderr
    assert "Traceback" not in out.stderr
