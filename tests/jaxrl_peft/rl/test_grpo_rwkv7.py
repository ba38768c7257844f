"""GRPO on RWKV-7 through the family interface: every one of the 14 methods of configs/grpo_rwkv7.py
builds on RWKV-7's modules and gets gradients, the task trains, and an RWKV-7 checkpoint loads through
family.load with the same dtype meaning as the decoder's."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import grpo_rwkv7, sft as sft_configs
from jaxrl_peft.infra import checkpoint as ckpt_lib, mesh as mesh_lib
from jaxrl_peft.models import family, hf, tiny
from jaxrl_peft.peft import registry
from jaxrl_peft.rl import grpo, rollout
from jaxrl_peft.train import loop, sft
from rwkv_jax import model as rwkv_model

TEXTS = ["What is 2 + 3? <think>\nAdd.\n</think>\n\\boxed{5}", "Solve x + 1 = 4. \\boxed{3}"] * 10


def _one_device():
    return mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny RWKV-7 (official init moved off its exact zeros) with tiny-r1-style tokenizer files."""
    path = tiny.build_r1_tokenizer(tmp_path_factory.mktemp("rwkv7"), TEXTS, vocab_size=300)
    config = rwkv_model.RWKV7Config(vocab_size=hf.Tokenizer(path).vocab_size, n_embd=64, n_layer=2, head_size=32,
                                    dim_ffn=128, decay_lora=8, iclr_lora=8, value_lora=8, gate_lora=8)
    params = nn.unbox(rwkv_model.RWKV7(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
    rwkv_model.save(str(path), config, params)
    return str(path)


def test_family_load_dispatches_and_dtype_is_the_parameter_dtype(checkpoint):
    assert family.detect(checkpoint) == "rwkv7"
    fam, params = family.load(checkpoint, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
    assert isinstance(fam, rwkv_model.RWKV7Family) and not fam.packs_segments
    assert params["blocks"]["att"]["key"]["kernel"].dtype == jnp.bfloat16
    assert fam.config.param_dtype == jnp.bfloat16 and fam.config.dtype == jnp.float32
    tok = fam.tokenizer()
    assert fam.stop_ids(tok) == [tok.eos_id]
    stored = json.loads((Path(checkpoint) / "config.json").read_text())
    assert stored["architecture"] == family.RWKV7_ARCHITECTURE


@pytest.mark.parametrize("method", sorted(grpo_rwkv7.METHODS))
def test_every_method_adapts_rwkv7(checkpoint, method):
    c = grpo_rwkv7.get_config(f"{method},tiny")
    fam, params = family.load(checkpoint)
    peft_method = registry.from_config(c.peft).prepare(params)
    params, adapter = registry.init_adapter(peft_method, jax.random.key(1), params)
    assert adapter, method
    model = fam.with_peft(peft_method)
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 250, (2, 10)), jnp.int32)
    labels = registry.labels(peft_method, adapter)

    def loss(a):
        return -model.token_logprobs(peft_method.model_variables(params, a), tokens)[0].mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(adapter)
    assert np.isfinite(float(value))
    trained = [g for g, lab in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if lab != "frozen"]
    assert trained and any(np.any(np.asarray(g) != 0) for g in trained), f"{method}: no gradient reaches the adapter"


def test_grpo_task_trains_rwkv7_two_steps(checkpoint, tmp_path):
    c = grpo_rwkv7.get_config("tiny")
    c.model.checkpoint = checkpoint
    c.reward_workers = 1
    c.mesh.update(data=1, fsdp=1, tensor=1)
    c.steps, c.checkpoint_every, c.eval_every = 2, 2, 0
    c.optim.learning_rate = 1e-2
    c.rl.update(prompts_per_step=2, group_size=4, max_new_tokens=16, micro_batch_size=8)
    c.eval.update(num_problems=2, samples=1, batch_size=8)
    task = grpo.GRPOTask(c, scorer=lambda completions, golds: [float(len(t) % 3 == 0) for t in completions])
    init = jax.tree.map(np.asarray, loop.build(grpo.GRPOTask(c, scorer=lambda c_, g: [0.0] * len(c_)), c,
                                               _one_device()).state.adapter)
    loop.train(task, c, tmp_path, mesh=_one_device())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows), rows
    trained = ckpt_lib.read_state(tmp_path, 2)["adapter"]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(trained)))


def test_sft_does_not_pack_rwkv7_rows(checkpoint):
    c = sft_configs.get_config("tiny")
    c.model.checkpoint = checkpoint
    c.data.update(train="", heldout="")
    examples = [([5, 6, 7], [8, 9]), ([10, 11], [12]), ([13], [14, 15])]
    task = sft.SFTTask(c, examples)
    task.setup(_one_device())
    assert sorted(task.epoch_rows(0)) == [[0], [1], [2]]  # the decoder packs these three into one row
    assert sft.pack([3, 4, 2], seq_len=16, packs=False) == [[0], [1], [2]]
    assert sft.pack([3, 4, 2], seq_len=16) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="more than the row length"):
        sft.pack([3, 40], seq_len=16, packs=False)


def test_sharded_rwkv7_sampler_equals_single_device(checkpoint):
    """The shared sampler on 8 devices (params placed by their logical axes, the recurrent state sharded
    over the batch) draws the same tokens as on one device, per-row budgets included."""
    tokens, mask = rollout.left_pad([[5, 6, 7, 8], [1, 2], [3], [9, 9, 9]] * 2, pad_id=0)
    sampling = rollout.SamplingConfig(max_new_tokens=10, temperature=1.0)
    budgets = np.array([10, 3, 7, 10] * 2, np.int32)
    fam, params = family.load(checkpoint)
    single = rollout.Sampler(fam, sampling, pad_id=0)({"params": params}, tokens, mask, jax.random.key(3),
                                                      budgets=budgets)
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    fam, sharded_params = family.load(checkpoint, mesh=mesh)
    out, state = rollout.Sampler(fam, sampling, pad_id=0, mesh=mesh)(
        {"params": sharded_params}, tokens, mask, jax.random.key(3), budgets=budgets, return_state=True)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-4)
    assert list(np.asarray(out.lengths)) == list(budgets)
    assert len(state.wkv.sharding.device_set) == 8
