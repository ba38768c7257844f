"""Our RL objectives against TRL 1.16's GRPOTrainer, the parity oracle of issue 14.

The loss is TRL's own code: GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py, TRL 1.16.0, line 3020)
called on a stand-in trainer whose forward pass returns the per-token log-probs under test, so autograd
gives TRL's gradient. Three pieces of TRL live inside its generation step and are transcribed here with
their lines: the advantages (2765-2788), the sampler importance weights (2660-2704) and the masking of
truncated completions (2487-2492). TRL is an optional test dependency (`pip install trl==1.16.0`).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft.rl import losses

torch = pytest.importorskip("torch")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

RTOL, ATOL = 1e-5, 1e-6
GROUP, PROMPTS, T, MAX_LEN = 4, 3, 7, 9
B = GROUP * PROMPTS


def _batch(seed=0):
    """Per-token log-probs whose ratios reach both clip sides, ragged masks, rewards with spread."""
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.35, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
    sampler = (old + rng.normal(0.0, 0.4, (B, T))).astype(np.float32)
    lengths = rng.integers(2, T + 1, B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1], np.float32)
    truncated = lengths == T
    return dict(logp=logp, old=old, ref=ref, sampler=sampler, mask=mask, rewards=rewards, truncated=truncated)


def trl_advantages(rewards, num_generations, scale_rewards):
    """grpo_trainer.py 2765-2788 (sum_then_normalize, one reward function, no NaN rewards)."""
    rewards = torch.tensor(rewards)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_utils.nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = trl_utils.nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def trl_sampler_weight(old, sampler, mask, mode, clip_max, clip_min=None):
    """grpo_trainer.py 2660-2704: the vLLM importance sampling ratio."""
    per_token_logps_diff = (old - sampler) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)


def trl_loss_and_grad(batch, advantages, *, loss_type, eps_low=0.2, eps_high=0.28, beta=0.0, bias_kl=False,
                      delta=None, level="token", is_mode=None, is_cap=2.0, is_floor=None,
                      mask_truncated=False, rows=slice(None), accumulation=1):
    """TRL's loss on `rows` of the batch (a micro-batch when `accumulation` > 1) and d loss / d logp."""
    mask = torch.tensor(batch["mask"])
    if mask_truncated:  # grpo_trainer.py 2487-2492
        is_truncated = torch.tensor(batch["truncated"])
        mask = mask * (~is_truncated).unsqueeze(1).int()
    num_items_in_batch = mask.sum()  # the whole generation batch
    logp = torch.tensor(batch["logp"][rows], requires_grad=True)
    old = torch.tensor(batch["old"][rows])
    inputs = {
        "prompt_ids": torch.zeros((logp.shape[0], 1), dtype=torch.long),
        "prompt_mask": torch.ones((logp.shape[0], 1), dtype=torch.long),
        "completion_ids": torch.zeros(logp.shape, dtype=torch.long),
        "completion_mask": mask[rows],
        "advantages": advantages[rows],
        "old_per_token_logps": old,
        "ref_per_token_logps": torch.tensor(batch["ref"][rows]),
        "num_items_in_batch": num_items_in_batch,
    }
    if is_mode is not None:
        inputs["importance_sampling_ratio"] = trl_sampler_weight(
            old, torch.tensor(batch["sampler"][rows]), mask[rows], is_mode, is_cap, is_floor)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=is_mode is not None, vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=accumulation,
        max_completion_length=MAX_LEN, _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, steps_per_generation=accumulation),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction: x),
    )
    loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.item(), logp.grad.numpy()


def our_loss_and_grad(batch, advantages, *, rows=slice(None), total_tokens=None, total_seqs=None,
                      mask_truncated=False, **kw):
    truncated = jnp.asarray(batch["truncated"][rows]) if mask_truncated else None

    def loss_fn(logp):
        return losses.policy_loss(
            logp, jnp.asarray(batch["old"][rows]), jnp.asarray(advantages[rows]), jnp.asarray(batch["mask"][rows]),
            ref_logp=jnp.asarray(batch["ref"][rows]), sampler_logp=jnp.asarray(batch["sampler"][rows]),
            truncated=truncated, max_len=MAX_LEN, total_tokens=total_tokens, total_seqs=total_seqs, **kw)[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(batch["logp"][rows]))
    return float(loss), np.asarray(grad)


# (name, TRL options, our options): every objective both have, each with and without its extras.
VARIANTS = [
    ("grpo", dict(loss_type="grpo"), dict(aggregation="grpo")),
    ("dapo", dict(loss_type="dapo"), dict(aggregation="dapo")),
    ("dr_grpo", dict(loss_type="dr_grpo"), dict(aggregation="dr_grpo")),
    ("dapo_no_clip", dict(loss_type="dapo", eps_low=10.0, eps_high=10.0), dict(eps_low=10.0, eps_high=10.0)),
    ("grpo_two_sided", dict(loss_type="grpo", delta=1.3), dict(aggregation="grpo", delta=1.3)),
    ("dapo_two_sided", dict(loss_type="dapo", delta=1.3), dict(delta=1.3)),
    ("dr_grpo_two_sided", dict(loss_type="dr_grpo", delta=1.3), dict(aggregation="dr_grpo", delta=1.3)),
    ("grpo_k3", dict(loss_type="grpo", beta=0.04), dict(aggregation="grpo", kl_coef=0.04)),
    ("dapo_k3", dict(loss_type="dapo", beta=0.04), dict(kl_coef=0.04)),
    ("dr_grpo_k3", dict(loss_type="dr_grpo", beta=0.04), dict(aggregation="dr_grpo", kl_coef=0.04)),
    ("dapo_k3_corrected", dict(loss_type="dapo", beta=0.04, bias_kl=True),
     dict(kl_coef=0.04, kl_estimator="k3_corrected")),
    ("gspo", dict(loss_type="grpo", level="sequence", eps_low=3e-4, eps_high=4e-4),
     dict(aggregation="grpo", importance_sampling_level="sequence", eps_low=3e-4, eps_high=4e-4)),
    ("gspo_dapo_wide", dict(loss_type="dapo", level="sequence"), dict(importance_sampling_level="sequence")),
    ("gspo_k3_corrected", dict(loss_type="grpo", level="sequence", beta=0.04, bias_kl=True),
     dict(aggregation="grpo", importance_sampling_level="sequence", kl_coef=0.04, kl_estimator="k3_corrected")),
    ("cispo", dict(loss_type="cispo", eps_high=1.2), dict(objective="cispo", cispo_cap=1.2)),
    ("cispo_uncapped", dict(loss_type="cispo", eps_high=50.0), dict(objective="cispo", cispo_cap=50.0)),
    ("cispo_sequence", dict(loss_type="cispo", eps_high=1.1, level="sequence"),
     dict(objective="cispo", cispo_cap=1.1, importance_sampling_level="sequence")),
    ("dapo_mask_truncated", dict(loss_type="dapo", mask_truncated=True), dict(mask_truncated=True)),
    ("grpo_mask_truncated", dict(loss_type="grpo", mask_truncated=True), dict(aggregation="grpo", mask_truncated=True)),
    ("dapo_is_token_truncate", dict(loss_type="dapo", is_mode="token_truncate", is_cap=2.0),
     dict(tis_cap=2.0, tis_mode="token_truncate")),
    ("dapo_is_token_mask", dict(loss_type="dapo", is_mode="token_mask", is_cap=1.5, is_floor=0.7),
     dict(tis_cap=1.5, tis_mode="token_mask", tis_floor=0.7)),
    ("grpo_is_sequence_truncate", dict(loss_type="grpo", is_mode="sequence_truncate", is_cap=3.0, is_floor=0.5),
     dict(aggregation="grpo", tis_cap=3.0, tis_mode="sequence_truncate", tis_floor=0.5)),
    ("dapo_is_sequence_mask", dict(loss_type="dapo", is_mode="sequence_mask", is_cap=3.0),
     dict(tis_cap=3.0, tis_mode="sequence_mask")),
]


@pytest.mark.parametrize("name,trl_kw,our_kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_loss_and_gradient_match_trl(name, trl_kw, our_kw):
    batch = _batch()
    advantages = trl_advantages(batch["rewards"], GROUP, "group")
    trl_loss, trl_grad = trl_loss_and_grad(batch, advantages, **trl_kw)
    our_loss, our_grad = our_loss_and_grad(batch, advantages.numpy(), **our_kw)
    np.testing.assert_allclose(our_loss, trl_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(our_grad, trl_grad, rtol=RTOL, atol=ATOL)
    assert np.abs(trl_grad).max() > 1e-3  # the comparison is not between two zeros


MICRO = [v for v in VARIANTS if v[0] in ("grpo", "dapo", "dr_grpo", "dapo_k3", "dapo_two_sided", "gspo", "cispo",
                                          "dapo_mask_truncated")]


@pytest.mark.parametrize("name,trl_kw,our_kw", MICRO, ids=[v[0] for v in MICRO])
def test_micro_batches_match_trl_gradient_accumulation(name, trl_kw, our_kw):
    batch = _batch(seed=1)
    advantages = trl_advantages(batch["rewards"], GROUP, "group")
    kept = batch["mask"] * (1.0 - batch["truncated"][:, None]) if our_kw.get("mask_truncated") else batch["mask"]
    halves = (slice(0, B // 2), slice(B // 2, B))
    for rows in halves:
        trl_loss, trl_grad = trl_loss_and_grad(batch, advantages, rows=rows, accumulation=2, **trl_kw)
        our_loss, our_grad = our_loss_and_grad(batch, advantages.numpy(), rows=rows,
                                               total_tokens=jnp.asarray(kept.sum()), total_seqs=B, **our_kw)
        np.testing.assert_allclose(our_loss, trl_loss, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(our_grad, trl_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
def test_advantages_match_trl(scale):
    rewards = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0.5, 0, 0, 0.25], np.float32)
    mode = {True: "group", False: "none"}.get(scale, scale)
    np.testing.assert_allclose(losses.group_advantages(jnp.asarray(rewards), GROUP, scale),
                               trl_advantages(rewards, GROUP, mode).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_importance_weight_matches_trl(mode):
    batch = _batch(seed=2)
    ours = losses.sampler_importance_weight(jnp.asarray(batch["old"]), jnp.asarray(batch["sampler"]),
                                            jnp.asarray(batch["mask"]), mode=mode, cap=1.8, floor=0.6)
    theirs = trl_sampler_weight(torch.tensor(batch["old"]), torch.tensor(batch["sampler"]),
                                torch.tensor(batch["mask"]), mode, 1.8, 0.6)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=RTOL, atol=ATOL)
    at_bounds = np.isclose(theirs.numpy(), 0.0) | np.isclose(theirs.numpy(), 1.8) | np.isclose(theirs.numpy(), 0.6)
    assert at_bounds.any() and not at_bounds.all()  # the bounds are reached, and not only them
