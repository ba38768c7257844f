"""The GRPO task on the training core: sharded equals single-device, non-finite values stop it, the
state is sharded as the dry run says, every method trains, and dry runs of every config."""

import importlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_peft.infra import checkpoint as ckpt_lib, mesh as mesh_lib
from jaxrl_peft.models import tiny
from jaxrl_peft.rl import grpo, rollout
from jaxrl_peft.train import loop, memory

ROOT = Path(__file__).resolve().parents[3]
# The decoder's per-method configs; configs/grpo_rwkv7.py (every method on RWKV-7) is test_grpo_rwkv7.py's.
CONFIGS = sorted(p.stem for p in ROOT.joinpath("configs").glob("grpo_*.py") if p.stem != "grpo_rwkv7")
TEXTS = ["What is 2 + 3? <think>\nAdd.\n</think>\n\\boxed{5}", "Solve x + 1 = 4. \\boxed{3}"] * 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TEXTS, vocab_size=300))


def _config(checkpoint, name="grpo_dora", **mesh):
    c = importlib.import_module(f"configs.{name}").get_config("tiny")
    c.model.checkpoint = checkpoint
    c.rl.micro_batch_size = 4
    c.optim.learning_rate = 1e-2
    c.reward_workers = 1
    c.mesh.update(mesh or dict(data=1, fsdp=1, tensor=1))
    return c


def _experience(seed=0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(5, 200, size=n)) for n in (5, 7, 3, 6, 4, 8, 5, 2)]
    n = 6
    out = rollout.Rollout(tokens=rng.integers(5, 200, size=(8, n)).astype(np.int32),
                          logprobs=-rng.random((8, n)).astype(np.float32), mask=np.ones((8, n), bool),
                          lengths=np.array([6, 3, 5, 1, 6, 2, 4, 6], np.int32), finished=np.ones(8, bool))
    adv = rng.normal(size=8).astype(np.float32)
    exp = grpo.build_experience(prompts, out, adv, pad_id=0, bucket=8)
    return exp.rows(), {"tokens": float(exp.loss_mask.sum()), "sequences": 8.0}


def _run(c, mesh):
    task = grpo.GRPOTask(c)
    return task, loop.build(task, c, mesh)


def test_build_experience_layout():
    out = rollout.Rollout(tokens=np.array([[7, 8, 9]], np.int32), logprobs=np.array([[-1.0, -2.0, -3.0]], np.float32),
                          mask=np.array([[True, True, False]]), lengths=np.array([2], np.int32),
                          finished=np.array([True]))
    exp = grpo.build_experience([[1, 2, 3]], out, np.array([0.5]), pad_id=0, bucket=4)
    assert exp.tokens.tolist() == [[1, 2, 3, 7, 8, 0, 0, 0]]
    assert exp.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0]]  # positions 2, 3 predict tokens 7, 8
    assert exp.sampler_logp.tolist() == [[0, 0, -1, -2, 0, 0, 0]]


@pytest.mark.parametrize("updates", [1, 2])  # 2: old log-probs recomputed, then two clipped updates
def test_sharded_update_equals_single_device(checkpoint, updates):
    c = _config(checkpoint)
    c.rl.updates_per_batch = updates
    single = _run(c, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    sharded = _run(c, mesh_lib.make_mesh(2, 2, 2))
    try:
        for _, run in (single, sharded):
            for s in range(2):
                m = run.update(*_experience(seed=s))
        assert m["grad_norm"] > 0
        for a, b in zip(jax.tree.leaves(single[1].state.adapter), jax.tree.leaves(sharded[1].state.adapter)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # Adam amplifies sum order
    finally:
        single[0].close()
        sharded[0].close()


def test_non_finite_loss_stops(checkpoint):
    task, run = _run(_config(checkpoint, "grpo_lora"), mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    try:
        rows, totals = _experience()
        rows["advantages"][0] = np.nan
        with pytest.raises(loop.TrainingDiverged, match="loss=nan"):
            run.update(rows, totals)
    finally:
        task.close()


def test_micro_batch_loop_makes_no_host_transfer(checkpoint):
    """The whole step (every micro-batch, the update, on_step) runs with host transfers disallowed."""
    c = _config(checkpoint, "grpo_adalora")
    task, run = _run(c, mesh_lib.make_mesh(1, 2, 1, jax.devices()[:2]))
    try:
        rows, totals = _experience()
        batch = loop.stack_micro_batches(rows, c.rl.micro_batch_size, run.mesh)
        assert next(iter(batch.values())).shape[0] == 2  # two micro-batches of 4 rows
        totals = jax.device_put({k: np.float32(v) for k, v in totals.items()}, mesh_lib.replicated(run.mesh))
        before = jax.tree.map(np.asarray, run.state.adapter)
        with jax.transfer_guard("disallow"):
            state, metrics = run.step_fn(run.frozen, run.state, batch, totals)
            jax.block_until_ready(state)
        assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
        assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before),
                                                                         jax.tree.leaves(state.adapter)))
    finally:
        task.close()


@pytest.mark.parametrize("name", ["grpo_lora", "grpo_full"])
@pytest.mark.parametrize("devices", [1, 8])
def test_dry_run_state_bytes_match_the_live_run(name, devices):
    c = importlib.import_module(f"configs.{name}").get_config("tiny")
    c.reward_workers = 1
    if devices == 8:
        c.mesh.fsdp = 8
    mesh = mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, jax.devices()[:devices])
    dry = memory.state_bytes_per_device(c, mesh)
    task, run = _run(c, mesh)
    try:
        live = run.state_bytes_per_device()
    finally:
        task.close()
    assert abs(dry - live) <= 0.1 * live, (dry, live)
    if name == "grpo_full":
        one = memory.state_bytes_per_device(c, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
        if devices == 8:
            assert live <= one / 5, (live, one)  # weights, adapter and Adam moments shard over fsdp
        else:  # one copy of the weights: the trained fp32 copy and two Adam moments, no frozen base
            n = sum(x.size for x in jax.tree.leaves(run.state.adapter))
            assert live < 13 * n, (live, n)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_method_trains_two_steps(name, tmp_path):
    c = _config(str(ROOT / "assets" / "tiny-r1"), name)  # the embedded model: rewards vary, so gradients flow
    c.steps, c.checkpoint_every, c.eval_every = 2, 2, 0
    c.rl.update(prompts_per_step=4, group_size=4, max_new_tokens=48, micro_batch_size=16)
    c.eval.update(num_problems=2, samples=1, batch_size=8)
    if name == "grpo_full":
        c.optim.learning_rate = 1e-3
    task = grpo.GRPOTask(c)
    init = jax.tree.map(np.asarray, loop.build(grpo.GRPOTask(c), c, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
                        .state.adapter)
    loop.train(task, c, tmp_path, mesh=mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows), rows
    assert (tmp_path / "ckpt" / "2").is_dir() and (tmp_path / "run.json").exists()
    trained = ckpt_lib.read_state(tmp_path, 2)["adapter"]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(trained))), \
        f"{name}: the adapter did not change in two steps"


def test_group_size_one_is_a_config_error(checkpoint):
    c = _config(checkpoint)
    c.rl.group_size = 1
    with pytest.raises(loop.ConfigError, match="rl.group_size=1"):
        grpo.GRPOTask(c)


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_every_config_at_paper_setting(name):
    c = importlib.import_module(f"configs.{name}").get_config("")
    est = memory.estimate(c, chips=8)
    assert est.total_params == 1_777_088_000
    assert 0 < est.trainable_params <= est.total_params
    assert est.lines()[0] == f"trainable_params={est.trainable_params} total_params=1777088000"
