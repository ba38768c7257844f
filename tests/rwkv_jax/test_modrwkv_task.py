"""ModRWKV training on the one core: both stages run and chain, a SIGKILLed run resumes bit-exact, 8 devices
give the losses of one, and the per-part PEFT split trains only what it names."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from configs.modrwkv import get_config
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.train import loop
from rwkv_jax import data, modrwkv_task
from rwkv_jax import model as rwkv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny random SigLIP tower (32 px, 16 tokens) and a tiny random RWKV-7 with tiny-rwkv7's tokenizer."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("modrwkv_task")
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=8))
    vision.save_pretrained(root / "siglip")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    cfg = rwkv.RWKV7Config(vocab_size=768, n_embd=32, n_layer=2, head_size=16, dim_ffn=64, decay_lora=8,
                           iclr_lora=8, value_lora=8, gate_lora=8)
    params = rwkv.RWKV7(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.default_rng(0)  # the official init zeroes the output projections: no token would see the image
    rwkv.save(str(root / "rwkv"), cfg, jax.tree.map(
        lambda x: (np.asarray(x) + rng.normal(0, 0.1, np.shape(x))).astype(np.float32), nn.unbox(params)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ROOT / "assets" / "tiny-rwkv7" / name, root / "rwkv" / name)
    return root


OVERRIDES = dict(steps=4, batch_size=8, micro_batch_size=4)


def small_config(parts, stages=("stage1", "stage2")):
    c = get_config("tiny")
    c.model.encoder, c.model.rwkv = str(parts / "siglip"), str(parts / "rwkv")
    c.data.update(synthetic_size=64, heldout_size=8, seq_len=64)
    c.train.update(batch_size=8, micro_batch_size=4)
    c.eval.update(examples=8, batch_size=8, max_new_tokens=3)
    for s in ("stage1", "stage2"):
        c[s].steps = 4
        c[s].train.batch_size = 8
    c.stages = tuple(stages)
    c.checkpoint_every = 2
    c.log_every = 100
    return c


def test_two_stages_chain_and_print_the_last_line(parts, tmp_path, capsys):
    c = small_config(parts)
    results = modrwkv_task.train_stages(c, tmp_path / "run")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("heldout_accuracy before=") and " shuffled=" in last
    assert set(results) == {"before", "after", "shuffled"}
    assert (tmp_path / "run" / "stage1" / "model" / "config.json").exists()
    stage2 = json.loads((tmp_path / "run" / "stage2" / "config.json").read_text())
    assert stage2["model"]["init"].endswith("stage1/model")
    assert modrwkv_task.train_stages(c, tmp_path / "run") == results  # finished stages are not rerun
    assert "stage1: done earlier" in capsys.readouterr().out


def test_stage1_trains_only_the_connector(parts, tmp_path):
    c = modrwkv_task.stage_config(small_config(parts, ("stage1",)), "stage1", None)
    c.optim.warmup_steps = 0  # the first update moves every weight
    task = modrwkv_task.ModRWKVTask(c)
    run = loop.build(task, c)
    assert set(run.state.adapter) == {"adapter"}
    before = jax.tree.map(np.asarray, run.state.adapter)
    rows, totals, _ = task.next_batch(1, run.frozen, run.state.adapter)
    run.update(rows, totals)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), run.state.adapter,
                                         before))
    assert all(m > 0 for m in moved)


def _losses(parts, tmp_path, mesh, name):
    c = modrwkv_task.stage_config(small_config(parts, ("stage2",)), "stage2", None)
    c.peft.hparams.target_modules = ("adapter/*", "llm/*")
    c.steps = 3
    task = modrwkv_task.ModRWKVTask(c)
    loop.train(task, c, tmp_path / name, mesh)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def test_eight_devices_give_the_losses_of_one(parts, tmp_path):
    assert jax.device_count() == 8
    one = _losses(parts, tmp_path, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]), "one")
    eight = _losses(parts, tmp_path, mesh_lib.make_mesh(1, -1, 1), "eight")
    np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-6)
    assert one[0] != one[-1]


def _cmd(parts, workdir):
    return [sys.executable, str(ROOT / "launch" / "train.py"), "--config=configs/modrwkv.py:tiny",
            f"--config.model.encoder={parts / 'siglip'}", f"--config.model.rwkv={parts / 'rwkv'}",
            "--config.stages=('stage1',)", "--config.stage1.steps=12", "--config.checkpoint_every=2",
            "--config.stage1.train.batch_size=8", "--config.train.batch_size=8", "--config.train.micro_batch_size=4",
            "--config.data.synthetic_size=64", "--config.data.heldout_size=8", "--config.data.seq_len=64",
            "--config.eval.examples=8", "--config.eval.max_new_tokens=3", f"--workdir={workdir}"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def _adapter(workdir, step):
    path = Path(workdir).absolute() / "stage1" / "ckpt" / str(step) / "state"
    return [np.asarray(x) for x in jax.tree.leaves(ocp.PyTreeCheckpointer().restore(path)["adapter"])]


@pytest.mark.slow  # three subprocess runs (minutes on 2 cores); tests/jaxrl_peft/rl/test_resume.py covers the core in CI
def test_sigkill_and_resume_is_bit_exact(parts, tmp_path):
    # 12 steps, checkpoints every 2: the kill at the first checkpoint leaves 10 steps to redo (with 4 steps an
    # idle machine finished the run before the kill landed)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(parts, full), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)
    proc = subprocess.Popen(_cmd(parts, killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not (killed / "stage1" / "ckpt" / "2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(_cmd(parts, killed), cwd=ROOT, env=_env(), check=True, capture_output=True, text=True,
                         timeout=900)
    assert "resumed from" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("heldout_accuracy")

    def metrics(workdir):
        rows = [json.loads(line) for line in (workdir / "stage1" / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]

    assert metrics(full) == metrics(killed)
    for x, y in zip(_adapter(full, 12), _adapter(killed, 12)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(_adapter(full, 12), _adapter(full, 10)))


def test_bad_input_is_named(parts, tmp_path):
    c = small_config(parts, ("stage1",))
    c.data.format, c.data.train = "llava", str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        modrwkv_task.ModRWKVTask(modrwkv_task.stage_config(c, "stage1", None)).setup(
            mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    records = data.shapes_records(4, 0)
    assert modrwkv_task.score("qa", records, [data.question_and_answer(r)[1].upper() + "." for r in records]) == 1.0


def test_stage2_with_full_connector_and_lora_language_model(parts):
    c = modrwkv_task.stage_config(small_config(parts, ("stage2",)), "stage2", None)
    c.optim.warmup_steps = 0
    c.peft = ml_collections.ConfigDict(dict(name="parts", hparams=dict(parts=dict(
        adapter=dict(name="full", hparams={}),
        llm=dict(name="lora", hparams=dict(r=4, alpha=8, target_modules=("att/key", "ffn/value")))))))
    task = modrwkv_task.ModRWKVTask(c)
    run = loop.build(task, c)
    assert set(run.state.adapter) == {"adapter", "llm"}
    lora = jax.tree_util.tree_flatten_with_path(run.state.adapter["llm"])[0]
    assert lora and all("lora" in jax.tree_util.keystr(path) for path, _ in lora)
    rows, totals, _ = task.next_batch(1, run.frozen, run.state.adapter)
    loss = [run.update(rows, totals)["loss"] for _ in range(3)]
    assert loss[-1] < loss[0]


def _three_losses(c):
    task = modrwkv_task.ModRWKVTask(c)
    run = loop.build(task, c, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    losses = []
    for step in range(1, 4):
        rows, totals, _ = task.next_batch(step, run.frozen, run.state.adapter)
        losses.append(run.update(rows, totals)["loss"])
    return rows, losses


def test_feature_cache_gives_the_losses_of_the_encoder(parts, tmp_path, capsys):
    c = modrwkv_task.stage_config(small_config(parts, ("stage2",)), "stage2", None)
    c.optim.warmup_steps = 0
    plain_rows, plain = _three_losses(c)
    c.data.feature_cache = str(tmp_path / "cache")
    rows, cached = _three_losses(c)
    assert "inputs" in plain_rows and "features" in rows and "inputs" not in rows
    assert rows["features"].shape == (8, 1, 16, 16)  # [rows, items, encoder tokens, width]
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    assert plain[0] != plain[-1]
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 64  # every training image, once
    assert "64 encoded" in capsys.readouterr().out
    _three_losses(c)  # a second run reads the cache: nothing encoded
    assert "64 items cached before, 0 encoded" in capsys.readouterr().out

    c.peft.hparams.target_modules = ("adapter/*", "encoder/*")  # a trained encoder cannot be cached
    with pytest.raises(loop.ConfigError, match="frozen encoder"):
        modrwkv_task.ModRWKVTask(c).setup(mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
