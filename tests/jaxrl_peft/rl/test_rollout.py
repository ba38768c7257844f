"""The sampler: greedy parity with transformers, padding invariance, stops and budgets, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import transformer as tfm
from jaxrl_peft.rl import rollout

CFG = tfm.preset("tiny", dtype="float32")


@pytest.fixture(scope="module")
def params():
    # Larger weights than the init so that the distribution is peaked and greedy paths are stable.
    p = tfm.init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, p)


def _sampler(**kw):
    sampling = rollout.SamplingConfig(**{"max_new_tokens": 12, "temperature": 0.0, **kw})
    return rollout.Sampler(tfm.Transformer(CFG), sampling, pad_id=0)


def test_greedy_equals_argmax_of_full_forward(params):
    model = tfm.Transformer(CFG)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    tokens, mask = rollout.left_pad(prompts, pad_id=0)
    out = _sampler()({"params": params}, tokens, mask, jax.random.key(0))
    for i, prompt in enumerate(prompts):
        # Teacher-forced: each generated token is the argmax after the prefix before it.
        seq = jnp.asarray([list(prompt) + list(np.asarray(out.tokens[i]))])
        logits = model.apply({"params": params}, seq)[0, len(prompt) - 1:-1]
        np.testing.assert_array_equal(jnp.argmax(logits, -1), out.tokens[i])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), out.tokens[i][:, None], -1)[:, 0]
        np.testing.assert_allclose(out.logprobs[i], logp, atol=1e-5)
    assert np.all(np.asarray(out.mask)) and list(np.asarray(out.lengths)) == [12, 12]
    assert not np.any(np.asarray(out.finished))


def test_prompt_alone_or_padded_in_batch_gives_same_sample(params):
    s = _sampler(temperature=1.0, top_p=0.9, top_k=50)
    key = jax.random.key(7)
    prompts = [[9, 8, 7, 6, 5, 4, 3, 2], [3, 4, 5]]
    tokens, mask = rollout.left_pad(prompts, pad_id=0)
    batch = s({"params": params}, tokens, mask, key)
    for i, prompt in enumerate(prompts):
        t, m = rollout.left_pad([prompt], pad_id=0)
        assert m.all()
        alone = s({"params": params}, t, m, key, row_ids=jnp.array([i]))
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-5)


def test_stop_tokens_and_budgets_per_row(params):
    tokens, mask = rollout.left_pad([[5, 6, 7], [5, 6, 7], [5, 6, 7]], pad_id=0)
    free = _sampler()({"params": params}, tokens, mask, jax.random.key(0))
    third = int(free.tokens[0, 2])
    stops = jnp.array([[third, -1], [-1, -1], [-1, -1]])
    out = _sampler()({"params": params}, tokens, mask, jax.random.key(0), stop_tokens=stops,
                     budgets=jnp.array([12, 12, 4]))
    first_stop = int(np.argmax(np.asarray(free.tokens[0]) == third))
    assert int(out.lengths[0]) == first_stop + 1 and bool(out.finished[0])
    assert int(out.tokens[0, first_stop]) == third and not bool(out.mask[0, first_stop + 1])
    assert int(out.lengths[1]) == 12 and not bool(out.finished[1])
    assert int(out.lengths[2]) == 4 and not bool(out.finished[2])
    assert np.all(np.asarray(out.tokens[2, 4:]) == 0)
    np.testing.assert_array_equal(out.tokens[1], free.tokens[1])


def test_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda f: np.isfinite(np.asarray(f)) & (np.asarray(f) > -1e30)  # noqa: E731
    assert kept(rollout.filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert kept(rollout.filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert kept(rollout.filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    # Sampling frequencies follow the filtered, renormalised distribution.
    cfg = rollout.SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.81)
    keys = jax.random.split(jax.random.key(0), 20000)
    toks, _ = rollout.sample_tokens(jnp.repeat(logits, 20000, axis=0), keys, cfg)
    freq = np.bincount(np.asarray(toks), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)
    with pytest.raises(ValueError, match="top_p"):
        rollout.SamplingConfig(top_p=0.0)


def test_sharded_sampler_equals_single_device(params):
    tokens, mask = rollout.left_pad([[5, 6, 7, 8], [1, 2], [3], [9, 9, 9]] * 2, pad_id=0)
    key = jax.random.key(3)
    single = _sampler(temperature=1.0)({"params": params}, tokens, mask, key)
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = tfm.shard_params(params, CFG, mesh)
    s = rollout.Sampler(tfm.Transformer(CFG), rollout.SamplingConfig(max_new_tokens=12, temperature=1.0),
                        pad_id=0, mesh=mesh)
    out = s({"params": sharded_params}, tokens, mask, key)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-4)
