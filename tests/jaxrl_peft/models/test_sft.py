"""Supervised fine-tuning: packing, the prompt-masked loss, and a loss that goes down."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft.models import sft
from jaxrl_peft.models import transformer as tfm

CFG = tfm.preset("tiny", vocab_size=32)


EXAMPLES = [([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 11, 12, 2]), ([1, 13, 14, 15], [16, 2]),
            ([1, 5, 9], [20, 21, 22, 2])]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
    return model.apply({"params": params}, tokens)


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
    loss, count = sft.sft_loss(logits, tokens, mask)
    assert int(count) == 7
    logp = jax.nn.log_softmax(logits[0])
    targets = [j for j in range(1, 13) if mask[0, j]]
    want = -np.mean([logp[j - 1, tokens[0, j]] for j in targets])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    # Logits that predict prompt tokens (or padding) have no gradient.
    grad = jax.grad(lambda lg: sft.sft_loss(lg, tokens, mask)[0])(logits)
    predicts_target = np.zeros(13, bool)
    predicts_target[[j - 1 for j in targets]] = True
    assert np.all(np.abs(np.asarray(grad[0, ~predicts_target])) == 0)
    assert np.all(np.abs(np.asarray(grad[0, predicts_target])).sum(-1) > 0)


def test_packed_loss_equals_loss_of_each_example_alone():
    model = tfm.Transformer(CFG)
    params = tfm.init_params(CFG, jax.random.key(1))
    packed = sft.evaluate_loss(model, {"params": params}, EXAMPLES, pad_id=0, seq_len=16, batch_size=2)
    # Reference: one example per row, plain causal forward (no segments, default positions).
    alone = sft.make_batch([[ex] for ex in EXAMPLES], pad_id=0, seq_len=16)
    logits = _forward(model, params, alone["tokens"])
    want, _ = sft.sft_loss(logits, jnp.asarray(alone["tokens"]), jnp.asarray(alone["loss_mask"]))
    np.testing.assert_allclose(packed, float(want), rtol=1e-5)


def test_training_reduces_loss_and_leaves_prompts_untrained():
    model = tfm.Transformer(CFG)
    params = tfm.init_params(CFG, jax.random.key(0))
    cfg = sft.SFTConfig(steps=40, batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=5, log_every=20)
    before = sft.evaluate_loss(model, {"params": params}, EXAMPLES, pad_id=0, seq_len=16)
    trained, losses = sft.train(model, params, EXAMPLES, cfg, pad_id=0, log=None)
    after = sft.evaluate_loss(model, {"params": trained}, EXAMPLES, pad_id=0, seq_len=16)
    assert len(losses) == 40 and after < 0.3 * before
    # Deterministic: the same inputs give the same parameters.
    again, _ = sft.train(model, params, EXAMPLES, cfg, pad_id=0, log=None)
    jax.tree.map(np.testing.assert_array_equal, trained, again)
    # The model learnt the completions, not the prompts: completion tokens are far likelier than
    # prompt tokens given their prefixes.
    seq = jnp.asarray([EXAMPLES[2][0] + EXAMPLES[2][1]])
    logp = jax.nn.log_softmax(_forward(model, trained, seq)[0, :-1])
    per_token = np.asarray(jnp.take_along_axis(logp, seq[0, 1:, None], -1)[:, 0])
    n_prompt = len(EXAMPLES[2][0])
    assert per_token[n_prompt - 1:].mean() > per_token[1:n_prompt - 1].mean() + 1.0
