"""Method sweeps: planning, resumable runs in subprocesses (a fake trainer stands in for launch/train.py in
the fast tests), the table's means and spreads, the plots, and (slow) the 4-method acceptance sweep."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from safetensors.numpy import load_file

from configs import base_grpo
from configs.grpo_full import get_config as full_config
from configs.grpo_lora import get_config as lora_config
from jaxrl_peft.analysis import sweep
from jaxrl_peft.peft import registry

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "grpo_dora.py") + ":tiny"

FAKE_TRAIN = textwrap.dedent('''
    """Stands in for launch/train.py: writes a finished run (or fails for --config.seed=13)."""
    import json, os, sys
    from pathlib import Path
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir = Path(args["workdir"])
    calls = workdir / "calls"
    calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
    if args["config.seed"] == "13":
        print("Traceback: out of memory", flush=True)
        sys.exit(1)
    config = json.loads(Path(os.environ["FAKE_CONFIG"]).read_text())
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "ckpt" / str(config["steps"])).mkdir(parents=True, exist_ok=True)
    seed, method = int(args["config.seed"]), Path(args["config"].split(":")[0]).stem
    with open(workdir / "metrics.jsonl", "w") as f:
        for step in range(1, config["steps"] + 1):
            f.write(json.dumps({"step": step, "reward": step / 100 + seed / 1000, "time_step": 0.5}) + "\\n")
    print(f"step {config['steps']}/{config['steps']} {method} {args.get('config.optim.learning_rate')}")
    print(f"heldout_accuracy before=0.250 after={0.3 + (seed - 42) / 100:.3f}")
''')


@pytest.fixture()
def fake_trainer(tmp_path, monkeypatch) -> Path:
    c = lora_config("tiny")
    c.steps = 12
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    monkeypatch.setenv("FAKE_CONFIG", str(tmp_path / "config.json"))
    script = tmp_path / "launch" / "train.py"
    script.parent.mkdir()
    script.write_text(FAKE_TRAIN)
    return script


def test_plan_defaults_to_all_fourteen_methods_and_checks_flags(tmp_path):
    runs = sweep.plan(CONFIG, None, [42, 43], tmp_path)
    assert len(runs) == 28 and len({r.method for r in runs}) == 14
    assert {"lora", "dora", "pissa", "milora", "vera", "ia3", "adalora", "full", "lntuning"} <= {r.method for r in runs}
    first = runs[0]
    assert first.workdir == tmp_path / first.method / "seed42" and first.config_flag.endswith(f"grpo_{first.method}.py:tiny")
    with pytest.raises(ValueError, match="no config for \\['lorax'\\]"):
        sweep.plan(CONFIG, ["lora", "lorax"], [42], tmp_path)
    with pytest.raises(ValueError, match="no field 'rl.nope'"):
        sweep.plan(CONFIG, ["lora"], [42], tmp_path, ["--config.rl.nope=3"])
    with pytest.raises(ValueError, match="use --seeds"):
        sweep.plan(CONFIG, ["lora"], [42], tmp_path, ["--config.seed=3"])
    with pytest.raises(ValueError, match="is not a file"):
        sweep.plan("configs/missing.py:tiny", ["lora"], [42], tmp_path)
    assert sweep.plan(CONFIG, ["lora"], [42], tmp_path, ["--config.steps=4"])[0].method == "lora"


def test_a_failed_run_does_not_stop_the_sweep_and_finished_runs_are_skipped(tmp_path, fake_trainer):
    out = tmp_path / "sweep"
    runs = sweep.plan(CONFIG, ["lora", "vera"], [42, 43, 13], out)
    lines = []
    counts = sweep.sweep(runs, ["--config.optim.learning_rate=0.002"], fake_trainer, log=lines.append)
    assert counts == {"ran": 6, "skipped": 0, "failed": 2}
    assert "[lora/seed42] step 12/12 grpo_lora 0.002" in lines  # the override reached the run; output streamed
    assert any("vera seed 13: FAILED (exit status 1)" in line for line in lines)
    assert "out of memory" in (out / "vera" / "seed13" / sweep.LOG).read_text()
    again = sweep.sweep(runs, ["--config.optim.learning_rate=0.002"], fake_trainer, log=lines.append)
    assert again == {"ran": 2, "skipped": 4, "failed": 2}  # only the failed runs are retried
    assert (out / "lora" / "seed42" / "calls").read_text() == "x"
    assert (out / "lora" / "seed13" / "calls").read_text() == "xx"

    written = sweep.write_outputs(runs, out, {"config": CONFIG, "overrides": [], "seeds": [42, 43, 13]})
    assert {p.name for p in written} == {"sweep.json", "sweep.md", "accuracy_vs_share.png", "reward_by_step.png"}
    assert all(p.stat().st_size > 0 for p in written)
    data = json.loads((out / "sweep.json").read_text())
    lora = next(m for m in data["methods"] if m["method"] == "lora")
    assert lora["finished"] == 2 and lora["status"] == "failed, ok"
    assert lora["heldout_after"] == pytest.approx(np.mean([0.300, 0.310]))
    assert lora["heldout_after_spread"] == pytest.approx(np.std([0.300, 0.310], ddof=1))
    # final train reward: mean of the last 10 of 12 steps, rewards step/100 + seed/1000
    finals = [np.mean([s / 100 + seed / 1000 for s in range(3, 13)]) for seed in (42, 43)]
    assert lora["final_reward"] == pytest.approx(np.mean(finals))
    assert lora["train_seconds"] == pytest.approx(6.0)
    assert lora["reward_by_step"] == pytest.approx([s / 100 + 0.0425 for s in range(1, 13)])
    # Independent count: LoRA r=32 on every linear of the 7 kinds, r * (in + out), from the safetensors shapes.
    shapes = {k: v.shape for k, v in load_file(ROOT / "assets" / "tiny-r1" / "model.safetensors").items()}
    want = sum(32 * sum(s) for k, s in shapes.items() if k.endswith("weight") and k.split(".")[-2] in base_grpo.ALL_LINEAR)
    assert lora["trainable_params"] == want
    assert lora["trainable_share"] == pytest.approx(want / sum(int(np.prod(s)) for s in shapes.values()))
    table = (out / "sweep.md").read_text()
    assert f"| lora | {want:,} |" in table and "0.305 ± 0.007" in table and "2/3 finished (failed, ok)" in table


def test_split_overrides_of_the_launcher():
    rest, overrides = sweep.split_overrides(["sweep.py", "--config=a.py:tiny", "--config.steps=4", "--out=x"])
    assert rest == ["sweep.py", "--config=a.py:tiny", "--out=x"] and overrides == ["--config.steps=4"]


def test_full_fine_tuning_keeps_a_tenth_of_the_peft_learning_rate():
    assert full_config("tiny").optim.learning_rate == pytest.approx(lora_config("tiny").optim.learning_rate / 10)
    assert full_config("").optim.learning_rate == 1e-6


def _parsed_config(*argv: str):
    """The config launch/train.py gets from these flags (its own config_flags definition, locked)."""
    argv = ["train.py", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("config", [CONFIG.replace("grpo_dora", "grpo_adalora"),
                                    str(ROOT / "configs" / "grpo_rwkv7.py") + ":adalora,tiny"])
def test_a_steps_override_reaches_the_adalora_budget_schedule(config):
    """A sweep's --config.steps=N must also shorten AdaLoRA's schedule (total_step), else its rank pruning
    stops part-way; an explicit total_step still wins, and resolved configs (config.json) hold numbers."""
    c = _parsed_config(f"--config={config}", "--config.steps=30")
    assert (c.steps, c.peft.hparams.total_step) == (30, 30)
    assert json.loads(c.to_json_best_effort())["peft"]["hparams"]["total_step"] == 30
    assert registry.from_config(c.peft).total_step == 30
    c = _parsed_config(f"--config={config}", "--config.peft.hparams.total_step=12", "--config.steps=30")
    assert (c.steps, c.peft.hparams.total_step) == (30, 12)
    c = _parsed_config(f"--config={config}")
    assert (c.steps, c.peft.hparams.total_step) == (60, 60)


@pytest.mark.slow
def test_four_method_sweep_of_four_steps(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "launch/sweep.py", "--config=configs/grpo_dora.py:tiny", "--methods=lora,dora,pissa,vera",
           "--config.steps=4", f"--out={out}"]
    # The runs see this machine's devices, not the 8 simulated ones of the test session (on 8 simulated CPU
    # devices PiSSA's initial randomized SVD of sharded kernels stalls in an all-gather).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = json.loads((out / "sweep.json").read_text())
    assert [m["method"] for m in data["methods"]] == ["lora", "dora", "pissa", "vera"]
    for m in data["methods"]:
        assert m["finished"] == 1 and 0 <= m["heldout_after"] <= 1 and len(m["reward_by_step"]) == 4, m
    assert data["methods"][3]["trainable_share"] < data["methods"][0]["trainable_share"]  # VeRA trains far fewer
    for name in ("sweep.md", "accuracy_vs_share.png", "reward_by_step.png"):
        assert (out / name).stat().st_size > 0
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "ran 0, skipped 4, failed 0" in again.stdout
