"""The supervised task on the training core: packing, the prompt-masked loss, a loss that goes down,
exact resume, and a bad data line named by file and line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft as sft_configs
from jaxrl_peft.infra import checkpoint, mesh as mesh_lib
from jaxrl_peft.models import tiny, transformer as tfm
from jaxrl_peft.peft import registry
from jaxrl_peft.train import loop, sft

CFG = tfm.preset("tiny", vocab_size=32)
EXAMPLES = [([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 11, 12, 2]), ([1, 13, 14, 15], [16, 2]),
            ([1, 5, 9], [20, 21, 22, 2])]
ONE = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])


def test_pack_and_batch_layout():
    rows = sft.pack([6, 6, 6, 6], seq_len=13)
    assert rows == [[0, 1], [2, 3]]
    batch = sft.make_batch([[EXAMPLES[0], EXAMPLES[1]]], pad_id=0, seq_len=13)
    np.testing.assert_array_equal(batch["tokens"][0], [1, 5, 6, 7, 8, 2, 1, 9, 10, 11, 12, 2, 0])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 6 + [2] * 6 + [0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="row length"):
        sft.pack([6, 14], seq_len=13)


def test_loss_counts_completion_tokens_only():
    batch = sft.make_batch([[EXAMPLES[0], EXAMPLES[1]]], pad_id=0, seq_len=13)
    tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"])
    logits = jax.random.normal(jax.random.key(0), (1, 13, CFG.vocab_size))

    def loss(lg):
        logp = jnp.take_along_axis(jax.nn.log_softmax(lg[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
        nll, count = sft.nll_sums(logp, mask)
        return nll / count, count

    value, count = loss(logits)
    assert int(count) == 7
    logp = jax.nn.log_softmax(logits[0])
    targets = [j for j in range(1, 13) if mask[0, j]]
    want = -np.mean([logp[j - 1, tokens[0, j]] for j in targets])
    np.testing.assert_allclose(value, want, rtol=1e-6)
    # Logits that predict prompt tokens (or padding) have no gradient.
    grad = jax.grad(lambda lg: loss(lg)[0])(logits)
    predicts_target = np.zeros(13, bool)
    predicts_target[[j - 1 for j in targets]] = True
    assert np.all(np.abs(np.asarray(grad[0, ~predicts_target])) == 0)
    assert np.all(np.abs(np.asarray(grad[0, predicts_target])).sum(-1) > 0)


def test_packed_loss_equals_loss_of_each_example_alone():
    model = tfm.Transformer(CFG)
    params = tfm.init_params(CFG, jax.random.key(1))

    def nll_fn(frozen, adapter, batch):
        del adapter
        logp = tfm.token_logprobs(model, {"params": frozen["base"]}, batch["tokens"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])[0]
        return sft.nll_sums(logp, batch["loss_mask"])

    packed = sft.heldout_loss(nll_fn, {"base": params}, {}, EXAMPLES, pad_id=0, seq_len=16, batch_size=2)
    # Reference: one example per row, plain causal forward (no segments, default positions), full logits.
    alone = sft.make_batch([[ex] for ex in EXAMPLES], pad_id=0, seq_len=16)
    logits = model.apply({"params": params}, jnp.asarray(alone["tokens"]))
    tokens = jnp.asarray(alone["tokens"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
    nll, count = sft.nll_sums(logp, jnp.asarray(alone["loss_mask"]))
    np.testing.assert_allclose(packed, float(nll / count), rtol=1e-5)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    texts = ["What is 2 + 3? <think>\nAdd.\n</think>\n\\boxed{5}", "Solve x + 1 = 4. \\boxed{3}"] * 10
    return tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), texts, vocab_size=300)


def _config(checkpoint_dir, method="full", steps=40):
    c = sft_configs.get_config("tiny")
    c.model.checkpoint = str(checkpoint_dir)
    c.peft.name = method
    c.peft.hparams = {} if method == "full" else dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    c.sft.update(batch_size=2, micro_batch_size=1, seq_len=16)
    c.optim.update(learning_rate=1e-2, warmup_steps=5)
    c.data.update(train="", heldout="")
    c.steps, c.eval_every, c.checkpoint_every, c.log_every = steps, 0, 10, 100
    return c


def test_training_reduces_loss_and_leaves_prompts_untrained(checkpoint_dir, tmp_path):
    c = _config(checkpoint_dir)
    run = loop.train(sft.SFTTask(c, EXAMPLES, heldout=EXAMPLES), c, tmp_path / "a", mesh=ONE)
    before, after = run.results["heldout_loss_before"], run.results["heldout_loss_after"]
    assert after < 0.3 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and rows[-1]["loss"] < rows[0]["loss"]
    # Deterministic: the same inputs give the same weights.
    again = loop.train(sft.SFTTask(c, EXAMPLES, heldout=EXAMPLES), c, tmp_path / "b", mesh=ONE)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.state.adapter), jax.device_get(again.state.adapter))
    # The model learnt the completions, not the prompts: completion tokens are far likelier than
    # prompt tokens given their prefixes.
    model = tfm.Transformer(run.task.cfg)
    weights = run.method.model_variables(run.frozen["base"], run.state.adapter)
    seq = jnp.asarray([list(EXAMPLES[2][0]) + list(EXAMPLES[2][1])])
    per_token = np.asarray(tfm.token_logprobs(model, weights, seq)[0][0])
    n_prompt = len(EXAMPLES[2][0])
    assert per_token[n_prompt - 1:].mean() > per_token[1:n_prompt - 1].mean() + 1.0


class _Crash(RuntimeError):
    pass


class _CrashingTask(sft.SFTTask):
    """Dies when asked for the batch of step `at` (after the checkpoint of the step before)."""

    def __init__(self, *args, at, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at

    def next_batch(self, step, frozen, adapter):
        if step == self.at:
            raise _Crash(f"killed before step {step}")
        return super().next_batch(step, frozen, adapter)


def test_resume_reads_the_same_rows_and_ends_identical(checkpoint_dir, tmp_path):
    c = _config(checkpoint_dir, "lora", steps=20)
    examples = EXAMPLES * 3  # several rows per epoch, so the data position matters
    full = loop.train(sft.SFTTask(c, examples), c, tmp_path / "full", mesh=ONE)
    with pytest.raises(_Crash):
        loop.train(_CrashingTask(c, examples, at=13), c, tmp_path / "part", mesh=ONE)
    assert checkpoint.read_state(tmp_path / "part", 10)["adapter"]
    resumed = loop.train(sft.SFTTask(c, examples), c, tmp_path / "part", mesh=ONE)
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state.adapter)),
                    jax.tree.leaves(jax.device_get(resumed.state.adapter))):
        np.testing.assert_array_equal(a, b)
    lines = lambda d: [{k: v for k, v in json.loads(x).items() if not k.startswith("time_")}  # noqa: E731
                       for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert lines(tmp_path / "full") == lines(tmp_path / "part")


def test_bad_data_line_names_file_and_line(checkpoint_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    c = _config(checkpoint_dir, "lora")
    c.data.update(train=str(data), heldout="")
    with pytest.raises(loop.ConfigError, match=r"train\.jsonl:2: expected a JSON object"):
        sft.SFTTask(c).setup(ONE)


def test_a_workdir_from_before_stacked_layers_is_refused_clearly(checkpoint_dir, tmp_path):
    c = _config(checkpoint_dir, "lora", steps=4)
    run = loop.build(sft.SFTTask(c, EXAMPLES), c, ONE)
    old = registry.unstack_layers(jax.device_get(run.state.adapter))  # the adapter tree as it was saved before
    assert "layers_0" in old and "layers" in run.state.adapter
    checkpoint.save_config(tmp_path, c)
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(2, {"adapter": old, "opt": {}, "method": {}}, {"epoch": 0, "row": 0},
               {"eval_before": 0.0, "updates": 2})
    saver.close()
    with pytest.raises(loop.ConfigError, match="written before the decoder's layers were stacked"):
        loop.train(sft.SFTTask(c, EXAMPLES), c, tmp_path, mesh=ONE)
