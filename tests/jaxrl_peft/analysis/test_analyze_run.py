"""launch/analyze.py --run: the spectral analysis of a training workdir (2-step tiny LoRA and PiSSA runs)
equals the analysis of the update computed independently from the base safetensors and the saved factors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs.grpo_lora import get_config as lora_config
from configs.grpo_pissa import get_config as pissa_config
from jaxrl_peft.analysis import spectral
from jaxrl_peft.infra import checkpoint as ckpt_lib, mesh as mesh_lib
from jaxrl_peft.peft import registry
from jaxrl_peft.rl import grpo
from jaxrl_peft.train import loop, rerun

ROOT = Path(__file__).resolve().parents[3]
MODULES = ("q_proj", "down_proj")


def _train(get_config, workdir: Path) -> Path:
    c = get_config("tiny")
    c.steps, c.checkpoint_every, c.eval_every = 2, 1, 0
    c.peft.hparams.target_modules = MODULES
    c.rl.update(prompts_per_step=4, group_size=4, max_new_tokens=64, micro_batch_size=16)  # some rewards
    c.eval.update(num_problems=2, samples=1, batch_size=8)
    c.reward_workers = 1
    # One device: PiSSA's randomized SVD of fsdp-sharded kernels stalls the 8 simulated CPU devices.
    loop.train(grpo.GRPOTask(c), c, workdir, mesh=mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    return workdir


@pytest.fixture(scope="module")
def base_kernels() -> dict[str, np.ndarray]:
    """[in, out] float64 kernels straight from the safetensors file (torch layout [out, in])."""
    tensors = load_file(ROOT / "assets" / "tiny-r1" / "model.safetensors")
    return {k: v.astype(np.float64).T for k, v in tensors.items() if k.endswith("proj.weight")}


def _torch_name(path: str) -> str:
    parts = path.split("/")  # layers_0/self_attn/q_proj
    return f"model.layers.{parts[0].split('_')[1]}.{parts[1]}.{parts[2]}.weight"


@pytest.mark.parametrize("name,get_config", [("lora", lora_config), ("pissa", pissa_config)])
def test_run_directory_analysis_matches_the_independent_update(name, get_config, base_kernels, tmp_path):
    workdir = _train(get_config, tmp_path / name)
    adapter = registry.unstack_layers(ckpt_lib.read_state(workdir, 2)["adapter"])  # per-layer paths
    first = registry.unstack_layers(ckpt_lib.read_state(workdir, 1)["adapter"])
    method, params, loaded, meta = rerun.load_run_adapter(workdir)
    assert meta["step"] == 2 and meta["peft_method"] == name
    records = spectral.analyze_run(method, params, loaded, k=4)
    assert sorted(r["name"] for r in records) == sorted(
        f"layers_{i}/{m}" for i in range(len({r['layer'] for r in records}))
        for m in ("self_attn/q_proj", "mlp/down_proj"))
    scaling = 64 / 32
    moved = 0.0
    for r in records:
        parts = r["name"].split("/")
        factors = adapter[parts[0]][parts[1]][parts[2]]
        a, b = factors["lora_a"].astype(np.float64), factors["lora_b"].astype(np.float64)
        update = scaling * a @ b  # LoRA: W1 = W0 + s A B
        if name == "pissa":  # W1 = W_res + s A B with W_res = W0 - s A0 B0: the update is s (A B - A0 B0)
            update = update - scaling * factors["lora_a0"].astype(np.float64) @ factors["lora_b0"]
        w0 = base_kernels[_torch_name(r["name"])]
        want = spectral.analyze(w0, w0 + update, k=4)
        for key in ("dw_rel_norm", "dw_top1_energy", "cosine"):
            assert r[key] == pytest.approx(want[key], rel=2e-3, abs=1e-6), (r["name"], key)
        np.testing.assert_allclose(r["bins_input"], want["bins_input"], atol=2e-3)
        np.testing.assert_allclose(r["dw_singular_values"][:2], want["dw_singular_values"][:2], rtol=2e-3)
        moved = max(moved, r["dw_rel_norm"])
    assert moved > 1e-5  # two steps moved the weights
    assert any(not np.array_equal(x, y) for x, y in zip(
        (f["lora_a"] for f in _leaves(first)), (f["lora_a"] for f in _leaves(adapter))))

    if name != "lora":  # the command line once
        return
    out = tmp_path / f"{name}_report"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "launch/analyze.py", f"--run={workdir}", "--step=1", f"--out={out}",
                           "--k=4", "--noplots"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "spectral.json").read_text())
    assert saved["meta"]["step"] == 1 and saved["meta"]["peft_method"] == name
    assert len(saved["records"]) == len(records)


def _leaves(adapter: dict):
    for layer in adapter.values():
        for block in layer.values():
            yield from block.values()


def test_a_workdir_without_checkpoints_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(lora_config("tiny").to_dict()))
    with pytest.raises(FileNotFoundError, match="saved no checkpoint"):
        rerun.load_run_adapter(tmp_path)
