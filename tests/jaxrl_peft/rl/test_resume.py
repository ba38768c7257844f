"""A run killed with SIGKILL and restarted in the same workdir ends exactly like an uninterrupted one, for the
embedded defaults of both families (the decoder and RWKV-7)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[3]
FLAGS = ["--config.steps=4", "--config.checkpoint_every=2",
         "--config.eval_every=0", "--config.rl.prompts_per_step=4", "--config.rl.group_size=4",
         "--config.rl.max_new_tokens=48", "--config.eval.num_problems=4", "--config.eval.samples=1",
         "--config.optim.learning_rate=1e-3"]
TIMING = ("time_rollout", "time_reward", "time_update", "time_step", "tokens_per_s")


def _cmd(workdir, config):
    return [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={config}", *FLAGS, f"--workdir={workdir}"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # one device, as a user's run
    return env


def _metrics(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _adapter(workdir, step):
    path = Path(workdir).absolute() / "ckpt" / str(step) / "state"
    return [np.asarray(x) for x in jax.tree.leaves(ocp.PyTreeCheckpointer().restore(path)["adapter"])]


@pytest.mark.parametrize("config", ["configs/grpo_dora.py:tiny", "configs/grpo_rwkv7.py:tiny"])
def test_sigkill_and_resume_is_bit_exact(tmp_path, config):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(full, config), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cmd(killed, config), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "ckpt" / "2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "ckpt" / "4").exists()
    out = subprocess.run(_cmd(killed, config), cwd=ROOT, env=_env(), check=True, capture_output=True, text=True,
                         timeout=600)
    assert "resumed from" in out.stdout and "heldout_accuracy before=" in out.stdout.splitlines()[-1]
    assert _metrics(full) == _metrics(killed)
    final_full, final_killed, mid = _adapter(full, 4), _adapter(killed, 4), _adapter(full, 2)
    for x, y in zip(final_full, final_killed):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(final_full, mid)), \
        "the adapter did not change between steps 2 and 4: the test could not detect a bad resume"
