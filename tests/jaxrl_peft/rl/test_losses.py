"""RL objectives against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft.rl import losses


def test_group_advantages():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = losses.group_advantages(r, 4)
    std = np.std([1, 0, 0, 1], ddof=1)  # 0.57735
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(adv[4:], 0.0)
    np.testing.assert_allclose(losses.group_advantages(r, 4, scale=False)[:4], [0.5, -0.5, -0.5, 0.5])


def test_dynamic_sampling_filter():
    r = jnp.array([1, 1, 0, 0, 0, 0, 1, 1, 1])
    assert losses.informative_groups(r, 3).tolist() == [True] * 3 + [False] * 6


def test_overlong_penalty():
    lengths = jnp.array([10, 16, 18, 20, 25])
    np.testing.assert_allclose(losses.overlong_penalty(lengths, max_len=20, buffer=4, penalty=1.0),
                               [0.0, 0.0, -0.5, -1.0, -1.0])
    np.testing.assert_allclose(losses.overlong_penalty(lengths, 20, 0), 0.0)


def _setup():
    # Two sequences; ratios exp(logp - old) chosen to hit both clip sides.
    old = jnp.zeros((2, 3))
    logp = jnp.log(jnp.array([[1.5, 1.0, 0.5], [1.5, 0.7, 0.9]]))
    adv = jnp.array([2.0, -1.0])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
    return logp, old, adv, mask


def test_clipping_both_sides_and_aggregations():
    logp, old, adv, mask = _setup()
    # seq 0 (A=2): ratio 1.5 -> clipped at 1.28 -> -2.56; 1.0 -> -2; 0.5 -> unclipped -1 (max(-1, -1.6))
    # seq 1 (A=-1): ratio 1.5 -> 1.5 (max(1.5, 1.28)); 0.7 -> clipped 0.8 (max(0.7, 0.8)); masked token
    tok = np.array([[-2.56, -2.0, -1.0], [1.5, 0.8, 0.0]])
    loss, m = losses.policy_loss(logp, old, adv, mask, aggregation="dapo")
    np.testing.assert_allclose(loss, tok.sum() / 5, rtol=1e-6)
    loss, _ = losses.policy_loss(logp, old, adv, mask, aggregation="grpo")
    np.testing.assert_allclose(loss, (tok[0].sum() / 3 + tok[1, :2].sum() / 2) / 2, rtol=1e-6)
    loss, _ = losses.policy_loss(logp, old, adv, mask, aggregation="dr_grpo", max_len=4)
    np.testing.assert_allclose(loss, tok.sum() / (2 * 4), rtol=1e-6)
    # Clipped tokens: seq0 t0 (high side), seq1 t1 (low side) -> 2 of 5.
    np.testing.assert_allclose(m["clip_fraction"], 2 / 5)
    np.testing.assert_allclose(m["clip_high_fraction"], 1 / 5)
    np.testing.assert_allclose(m["clip_low_fraction"], 1 / 5)


def test_clipped_tokens_have_no_gradient():
    logp, old, adv, mask = _setup()
    g = jax.grad(lambda lp: losses.policy_loss(lp, old, adv, mask, aggregation="dapo")[0])(logp)
    g = np.asarray(g)
    assert g[0, 0] == 0.0 and g[1, 1] == 0.0 and g[1, 2] == 0.0  # clipped, clipped, masked
    np.testing.assert_allclose(g[0, 1], -2.0 * 1.0 / 5, rtol=1e-6)  # d(-A·ρ)/dlogp = -A·ρ
    np.testing.assert_allclose(g[1, 0], 1.0 * 1.5 / 5, rtol=1e-6)


def test_micro_batches_add_up_to_the_batch_loss():
    logp, old, adv, mask = _setup()
    for agg, kw in (("dapo", {}), ("grpo", {}), ("dr_grpo", {"max_len": 3})):
        whole, _ = losses.policy_loss(logp, old, adv, mask, aggregation=agg, **kw)
        parts = sum(losses.policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                                       aggregation=agg, total_tokens=mask.sum(), total_seqs=2, **kw)[0]
                    for i in range(2))
        np.testing.assert_allclose(parts, whole, rtol=1e-6)


def test_kl_and_truncated_importance_weight():
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.5]]))
    k1 = losses.kl_estimate(logp, ref, "k1")
    k3 = losses.kl_estimate(logp, ref, "k3")
    np.testing.assert_allclose(k1, [[np.log(2), -np.log(2)]], rtol=1e-6)
    np.testing.assert_allclose(k3, [[0.5 - np.log(0.5) - 1, 2 - np.log(2) - 1]], rtol=1e-6)
    mask = jnp.ones((1, 2))
    adv = jnp.array([1.0])
    base, _ = losses.policy_loss(logp, logp, adv, mask)
    with_kl, m = losses.policy_loss(logp, logp, adv, mask, ref_logp=ref, kl_coef=0.1)
    np.testing.assert_allclose(with_kl - base, 0.1 * k3.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], k3.mean(), rtol=1e-5)
    sampler = logp - jnp.log(jnp.array([[3.0, 0.5]]))  # weights exp(old - sampler) = 3 (capped 2), 0.5
    tis, _ = losses.policy_loss(logp, logp, adv, mask, sampler_logp=sampler, tis_cap=2.0)
    np.testing.assert_allclose(tis, (-1.0 * 2.0 + -1.0 * 0.5) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        losses.policy_loss(logp, logp, adv, mask, kl_coef=0.1)


def test_reward_scaling_modes():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    centred = np.array([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    np.testing.assert_allclose(losses.group_advantages(r, 4, "none"), centred, rtol=1e-6)
    np.testing.assert_allclose(losses.group_advantages(r, 4, False), centred, rtol=1e-6)
    batch_std = np.std([1, 0, 0, 1, 1, 1, 1, 0], ddof=1)
    np.testing.assert_allclose(losses.group_advantages(r, 4, "batch"), centred / (batch_std + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(losses.group_advantages(r, 4, "group"), losses.group_advantages(r, 4, True))
    with pytest.raises(ValueError, match="scale_rewards"):
        losses.group_advantages(r, 4, "groups")


def test_truncated_sequences_leave_the_loss():
    logp, old, adv, mask = _setup()
    only_first, _ = losses.policy_loss(logp[:1], old[:1], adv[:1], mask[:1], aggregation="dapo")
    masked, _ = losses.policy_loss(logp, old, adv, mask, aggregation="dapo", truncated=jnp.array([False, True]))
    np.testing.assert_allclose(masked, only_first, rtol=1e-6)
    g = jax.grad(lambda lp: losses.policy_loss(lp, old, adv, mask, truncated=jnp.array([False, True]))[0])(logp)
    assert np.all(np.asarray(g)[1] == 0.0)


def test_sequence_ratio_cispo_and_two_sided_clipping_by_hand():
    logp, old, adv, mask = _setup()
    # GSPO: one ratio per sequence, exp(mean log-ratio): seq 0 (0.75)^(1/3)·... computed in float64.
    seq_ratio = np.exp([np.log([1.5, 1.0, 0.5]).mean(), np.log([1.5, 0.7]).mean()])
    per_seq = np.maximum(-np.array([2.0, -1.0]) * seq_ratio, -np.array([2.0, -1.0]) * np.clip(seq_ratio, 0.8, 1.28))
    loss, _ = losses.policy_loss(logp, old, adv, mask, aggregation="grpo", importance_sampling_level="sequence")
    np.testing.assert_allclose(loss, per_seq.mean(), rtol=1e-6)
    # CISPO: -min(ρ, cap)·A·logp with no gradient through the weight: d/dlogp = -min(ρ, cap)·A / n_tokens.
    g = jax.grad(lambda lp: losses.policy_loss(lp, old, adv, mask, objective="cispo", cispo_cap=1.2)[0])(logp)
    np.testing.assert_allclose(g[0], -np.minimum([1.5, 1.0, 0.5], 1.2) * 2.0 / 5, rtol=1e-6)
    # Two-sided (δ above 1+ε_high, as TRL means it): A<0 and ρ=1.5 costs min(ρ, δ)=1.4 instead of 1.5.
    loss, _ = losses.policy_loss(logp, old, adv, mask, aggregation="dapo", delta=1.4)
    np.testing.assert_allclose(loss, (-2.56 - 2.0 - 1.0 + 1.4 + 0.8) / 5, rtol=1e-6)


def test_bias_corrected_kl_and_sequence_sampler_weight():
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.5]]))
    weight = jnp.array([[2.0, 0.5]])
    k3 = losses.kl_estimate(logp, ref, "k3")
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k3_corrected", importance_weight=weight), k3 * weight)
    with pytest.raises(ValueError, match="importance_weight"):
        losses.kl_estimate(logp, ref, "k3_corrected")
    mask = jnp.array([[1.0, 1.0, 0.0]])
    old = jnp.log(jnp.array([[0.5, 0.5, 0.5]]))
    sampler = jnp.log(jnp.array([[0.25, 0.5, 0.01]]))  # the masked token would weigh 50
    w = losses.sampler_importance_weight(old, sampler, mask, mode="sequence_truncate", cap=3.0)
    np.testing.assert_allclose(w, [[2.0]], rtol=1e-6)
    w = losses.sampler_importance_weight(old, sampler, mask, mode="sequence_mask", cap=1.5)
    np.testing.assert_allclose(w, [[0.0]])
    w = losses.sampler_importance_weight(old, sampler, mask, mode="token_truncate", cap=1.5, floor=1.1)
    np.testing.assert_allclose(w, [[1.5, 1.1, 1.1]], rtol=1e-6)  # a masked token weighs 1 before clipping
