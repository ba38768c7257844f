"""RL objectives as pure functions: group advantages, DAPO filters and penalties, the clipped
policy-gradient loss with GRPO / DAPO / Dr. GRPO aggregation, its GSPO (sequence-level ratio), CISPO and
two-sided-clipping variants, KL estimators, and the sampler/learner importance weights.

Shapes: B sequences (G completions per prompt, groups contiguous), T completion tokens. The formulas follow
TRL 1.16's GRPOTrainer (trl/trainer/grpo_trainer.py) term for term; tests/jaxrl_peft/rl/test_losses_trl.py
checks them against it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Aggregation = Literal["grpo", "dapo", "dr_grpo"]
Objective = Literal["clip", "cispo"]
RewardScaling = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k3", "k3_corrected"]
ImportanceSamplingLevel = Literal["token", "sequence"]
SamplerCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def reward_scaling(scale: bool | str) -> RewardScaling:
    """The reward-scaling mode named by `scale`: True/False stay accepted as 'group'/'none' (as in TRL)."""
    mode = ("group" if scale else "none") if isinstance(scale, bool) else scale
    if mode not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch', 'none', True or False, got {scale!r}")
    return mode


def group_advantages(rewards: Array, group_size: int, scale: bool | str = True, eps: float = 1e-4) -> Array:
    """A_i = r_i - mean(group), divided by (unbiased std + eps) of the group ('group' / True: GRPO, DAPO),
    of the whole batch given ('batch'), or not at all ('none' / False: Dr. GRPO).

    rewards: [B] with B a multiple of group_size. With 'batch', pass every host's rewards so the std is
    the global batch's.
    """
    mode = reward_scaling(scale)
    r = rewards.reshape(-1, group_size).astype(jnp.float32)  # [prompts, G]
    adv = r - r.mean(axis=1, keepdims=True)
    if mode == "group":
        adv = adv / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    elif mode == "batch":
        adv = adv / (jnp.std(r, ddof=1) + eps)
    return adv.reshape(-1)


def informative_groups(rewards: Array, group_size: int) -> Array:
    """DAPO dynamic sampling: True for every completion of a group whose rewards are not all equal."""
    r = rewards.reshape(-1, group_size)
    keep = jnp.any(r != r[:, :1], axis=1)
    return jnp.repeat(keep, group_size)


def overlong_penalty(lengths: Array, max_len: int, buffer: int, penalty: float = 1.0) -> Array:
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linear down to -penalty."""
    if buffer <= 0:
        return jnp.zeros(lengths.shape, jnp.float32)
    start = max_len - buffer
    ramp = (start - lengths.astype(jnp.float32)) / buffer * penalty
    return jnp.where(lengths <= start, 0.0, jnp.maximum(ramp, -penalty))


def kl_estimate(logp: Array, ref_logp: Array, estimator: KLEstimator = "k3",
                importance_weight: Array | None = None) -> Array:
    """Per-token estimate of KL(policy || reference) from samples of the old policy.

    'k1': log(π/π_ref); 'k3': π_ref/π - log(π_ref/π) - 1 (Schulman's unbiased, positive estimator);
    'k3_corrected': k3 times the importance weight π/π_old (`importance_weight`, gradient kept), which
    removes k3's bias when the samples come from π_old (TRL's use_bias_correction_kl).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    k3 = jnp.exp(log_ratio) - log_ratio - 1.0
    if estimator == "k3":
        return k3
    if estimator == "k3_corrected":
        if importance_weight is None:
            raise ValueError("kl estimator 'k3_corrected' needs importance_weight (π/π_old)")
        return k3 * importance_weight
    raise ValueError(f"kl estimator must be 'k1', 'k3' or 'k3_corrected', got {estimator!r}")


def sampler_importance_weight(old_logp: Array, sampler_logp: Array, mask: Array, *,
                              mode: SamplerCorrection = "token_truncate", cap: float = 2.0,
                              floor: float | None = None) -> Array:
    """Weight correcting for the sampler's log-probs differing from the learner's (vLLM vs trainer in TRL).

    'token_*': exp(old - sampler) per token, [B, T]; 'sequence_*': exp of the masked sum over the
    sequence, [B, 1]. '*_truncate' clips the weight into [floor, cap]; '*_mask' zeroes weights outside
    it. A NaN sampler log-prob counts as no difference. No gradient flows through the weight.
    """
    diff = jnp.nan_to_num((old_logp - sampler_logp) * mask, nan=0.0)  # [B, T]
    if mode.startswith("sequence_"):
        diff = diff.sum(axis=-1, keepdims=True)  # [B, 1]
    elif not mode.startswith("token_"):
        raise ValueError(f"sampler correction mode must be token_/sequence_ + truncate/mask, got {mode!r}")
    weight = jnp.exp(diff)
    if mode.endswith("_truncate"):
        weight = jnp.clip(weight, floor, cap)
    elif mode.endswith("_mask"):
        outside = weight > cap if floor is None else (weight < floor) | (weight > cap)
        weight = jnp.where(outside, 0.0, weight)
    else:
        raise ValueError(f"sampler correction mode must be token_/sequence_ + truncate/mask, got {mode!r}")
    return jax.lax.stop_gradient(weight)


def policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *,
                eps_low: float = 0.2, eps_high: float = 0.28, aggregation: Aggregation = "dapo",
                max_len: int | None = None, ref_logp: Array | None = None, kl_coef: float = 0.0,
                kl_estimator: KLEstimator = "k3", sampler_logp: Array | None = None,
                tis_cap: float = 0.0, total_tokens: Array | None = None,
                total_seqs: Array | None = None, objective: Objective = "clip", cispo_cap: float = 5.0,
                importance_sampling_level: ImportanceSamplingLevel = "token", delta: float | None = None,
                truncated: Array | None = None, tis_mode: SamplerCorrection = "token_truncate",
                tis_floor: float | None = None) -> tuple[Array, dict[str, Array]]:
    """Policy-gradient loss (to minimise) and its metrics.

    logp/old_logp/mask: [B, T]; advantages: [B]; truncated: [B] bool, sequences cut at the length limit,
    masked out of the loss (DAPO's overlong filtering; count only the kept tokens in total_tokens).
    Importance weight ρ = exp(logp - old) per token, or exp(masked mean of logp - old) per sequence when
    importance_sampling_level='sequence' (GSPO).
    objective 'clip': per token max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high)), with ρ capped at `delta` in the
    first term when given (two-sided clipping). 'cispo': -sg(min(ρ, cispo_cap))·A·logp, so every token
    keeps a gradient. When tis_cap > 0 the term is multiplied by the sampler/learner weight
    (sampler_importance_weight with tis_mode, cap tis_cap, floor tis_floor); then kl_coef·KL is added.
    Aggregation: 'grpo' averages tokens within a sequence then over sequences, 'dapo' averages over every
    token of the batch, 'dr_grpo' divides the token sum by B·max_len. total_tokens / total_seqs override
    the normalisers so that micro-batch losses add up to the loss of the whole batch.
    """
    mask = mask.astype(jnp.float32)
    if truncated is not None:
        mask = mask * (1.0 - truncated.astype(jnp.float32))[:, None]
    log_ratio = logp - old_logp  # [B, T]
    if importance_sampling_level == "token":
        log_weight = log_ratio
    elif importance_sampling_level == "sequence":
        log_weight = (log_ratio * mask).sum(axis=-1, keepdims=True) / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = jnp.exp(log_weight)  # [B, T] or [B, 1]
    adv = advantages[:, None].astype(jnp.float32)
    if objective == "clip":
        clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
        capped = ratio if delta is None else jnp.minimum(ratio, delta)
        per_token = jnp.maximum(-adv * capped, clipped)
    elif objective == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(ratio, cispo_cap)) * adv * logp
    else:
        raise ValueError(f"objective must be 'clip' or 'cispo', got {objective!r}")
    per_token = jnp.broadcast_to(per_token, mask.shape)
    if tis_cap > 0:
        if sampler_logp is None:
            raise ValueError("tis_cap > 0 needs sampler_logp")
        per_token = per_token * sampler_importance_weight(old_logp, sampler_logp, mask, mode=tis_mode,
                                                          cap=tis_cap, floor=tis_floor)
    kl = jnp.zeros_like(per_token)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_estimate(logp, ref_logp, kl_estimator, importance_weight=ratio)
        per_token = per_token + kl_coef * kl
    n_tokens = mask.sum()
    if aggregation == "dapo":
        denom = n_tokens if total_tokens is None else total_tokens
        loss = (per_token * mask).sum() / jnp.maximum(denom, 1.0)
    elif aggregation == "grpo":
        denom = mask.shape[0] if total_seqs is None else total_seqs
        seq_mean = (per_token * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
        loss = seq_mean.sum() / denom
    elif aggregation == "dr_grpo":
        if max_len is None:
            raise ValueError("dr_grpo aggregation needs max_len")
        denom = mask.shape[0] if total_seqs is None else total_seqs
        loss = (per_token * mask).sum() / (denom * max_len)
    else:
        raise ValueError(f"aggregation must be 'grpo', 'dapo' or 'dr_grpo', got {aggregation!r}")
    tokens = jnp.maximum(n_tokens, 1.0)
    ratio_tokens = jnp.broadcast_to(ratio, mask.shape)
    if objective == "clip":
        low = (ratio_tokens < 1.0 - eps_low) & (adv < 0)
        high = (ratio_tokens > 1.0 + eps_high) & (adv > 0)
    else:
        low = jnp.zeros(mask.shape, bool)
        high = (ratio_tokens > cispo_cap) & (adv > 0)
    metrics = {
        "clip_fraction": ((low | high) * mask).sum() / tokens,
        "clip_low_fraction": (low * mask).sum() / tokens,
        "clip_high_fraction": (high * mask).sum() / tokens,
        "kl": (kl * mask).sum() / tokens,
        "ratio_mean": (ratio_tokens * mask).sum() / tokens,
    }
    return loss, metrics
