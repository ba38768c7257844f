"""RL objectives as pure functions: group advantages, DAPO filters and penalties, the clipped
policy-gradient loss with GRPO / DAPO / Dr. GRPO aggregation, KL estimators, truncated IS weights.

Shapes: B sequences (G completions per prompt, groups contiguous), T completion tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Aggregation = Literal["grpo", "dapo", "dr_grpo"]


def group_advantages(rewards: Array, group_size: int, scale: bool = True, eps: float = 1e-4) -> Array:
    """A_i = r_i - mean(group), divided by (unbiased group std + eps) when `scale` (GRPO, DAPO).

    Dr. GRPO uses scale=False. rewards: [B] with B a multiple of group_size.
    """
    r = rewards.reshape(-1, group_size).astype(jnp.float32)  # [prompts, G]
    adv = r - r.mean(axis=1, keepdims=True)
    if scale:
        adv = adv / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
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


def kl_estimate(logp: Array, ref_logp: Array, estimator: Literal["k1", "k3"] = "k3") -> Array:
    """Per-token estimate of KL(policy || reference) from samples of the policy."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return jnp.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *,
                eps_low: float = 0.2, eps_high: float = 0.28, aggregation: Aggregation = "dapo",
                max_len: int | None = None, ref_logp: Array | None = None, kl_coef: float = 0.0,
                kl_estimator: Literal["k1", "k3"] = "k3", sampler_logp: Array | None = None,
                tis_cap: float = 0.0, total_tokens: Array | None = None,
                total_seqs: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate loss (to minimise) and its metrics.

    logp/old_logp/mask: [B, T]; advantages: [B]. per token: max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high))
    (+ kl_coef·KL), times the truncated importance weight min(exp(old - sampler), tis_cap) when
    tis_cap > 0. Aggregation: 'grpo' averages tokens within a sequence then over sequences, 'dapo'
    averages over every token of the batch, 'dr_grpo' divides the token sum by B·max_len.
    total_tokens / total_seqs override the normalisers so that micro-batch losses add up to the loss
    of the whole batch (gradient accumulation).
    """
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None].astype(jnp.float32)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    if tis_cap > 0:
        if sampler_logp is None:
            raise ValueError("tis_cap > 0 needs sampler_logp")
        per_token = per_token * jax.lax.stop_gradient(jnp.minimum(jnp.exp(old_logp - sampler_logp), tis_cap))
    kl = jnp.zeros_like(per_token)
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        kl = kl_estimate(logp, ref_logp, kl_estimator)
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
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics = {
        "clip_fraction": ((low | high) * mask).sum() / tokens,
        "clip_low_fraction": (low * mask).sum() / tokens,
        "clip_high_fraction": (high * mask).sum() / tokens,
        "kl": (kl * mask).sum() / tokens,
        "ratio_mean": (ratio * mask).sum() / tokens,
    }
    return loss, metrics
