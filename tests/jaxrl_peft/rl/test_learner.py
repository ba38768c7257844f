"""The learner's update: sharded equals single-device, non-finite values stop it; dry runs of every config."""

import importlib
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_peft.infra import memory, mesh as mesh_lib
from jaxrl_peft.models import tiny
from jaxrl_peft.rl import learner as learner_lib, rollout

CONFIGS = sorted(p.stem for p in Path(__file__).resolve().parents[3].joinpath("configs").glob("grpo_*.py"))
TEXTS = ["What is 2 + 3? <think>\nAdd.\n</think>\n\\boxed{5}", "Solve x + 1 = 4. \\boxed{3}"] * 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TEXTS, vocab_size=300))


def _config(checkpoint, name="grpo_dora", **mesh):
    c = importlib.import_module(f"configs.{name}").get_config("tiny")
    c.model.checkpoint = checkpoint
    c.rl.micro_batch_size = 4
    c.optim.learning_rate = 1e-2
    c.mesh.update(mesh or dict(data=1, fsdp=1, tensor=1))
    return c


def _experience(learner, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(5, 200, size=n)) for n in (5, 7, 3, 6, 4, 8, 5, 2)]
    n = 6
    out = rollout.Rollout(tokens=rng.integers(5, 200, size=(8, n)).astype(np.int32),
                          logprobs=-rng.random((8, n)).astype(np.float32), mask=np.ones((8, n), bool),
                          lengths=np.array([6, 3, 5, 1, 6, 2, 4, 6], np.int32), finished=np.ones(8, bool))
    adv = rng.normal(size=8).astype(np.float32)
    return learner_lib.build_experience(prompts, out, adv, pad_id=0, bucket=8)


def test_build_experience_layout():
    out = rollout.Rollout(tokens=np.array([[7, 8, 9]], np.int32), logprobs=np.array([[-1.0, -2.0, -3.0]], np.float32),
                          mask=np.array([[True, True, False]]), lengths=np.array([2], np.int32),
                          finished=np.array([True]))
    exp = learner_lib.build_experience([[1, 2, 3]], out, np.array([0.5]), pad_id=0, bucket=4)
    assert exp.tokens.tolist() == [[1, 2, 3, 7, 8, 0, 0, 0]]
    assert exp.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0]]  # positions 2, 3 predict tokens 7, 8
    assert exp.sampler_logp.tolist() == [[0, 0, -1, -2, 0, 0, 0]]


@pytest.mark.parametrize("updates", [1, 2])  # 2: old log-probs recomputed, then two clipped updates
def test_sharded_update_equals_single_device(checkpoint, updates):
    c = _config(checkpoint)
    c.rl.updates_per_batch = updates
    single = learner_lib.Learner(c, mesh=mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    sharded = learner_lib.Learner(c, mesh=mesh_lib.make_mesh(2, 2, 2))
    try:
        for lrn in (single, sharded):
            for s in range(2):
                m = lrn.update(_experience(lrn, seed=s))
        assert m["grad_norm"] > 0
        for a, b in zip(jax.tree.leaves(single.adapter), jax.tree.leaves(sharded.adapter)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # Adam amplifies sum order
    finally:
        single.close()
        sharded.close()


def test_non_finite_loss_stops(checkpoint):
    lrn = learner_lib.Learner(_config(checkpoint, "grpo_lora"), mesh=mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    try:
        exp = _experience(lrn)
        exp.advantages[0] = np.nan
        with pytest.raises(learner_lib.TrainingDiverged, match="loss=nan"):
            lrn.update(exp)
    finally:
        lrn.close()


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_every_config_at_paper_setting(name):
    c = importlib.import_module(f"configs.{name}").get_config("")
    est = memory.estimate(c, chips=8)
    assert est.total_params == 1_777_088_000
    assert 0 < est.trainable_params <= est.total_params
    assert est.lines()[0] == f"trainable_params={est.trainable_params} total_params=1777088000"
