"""The one optimizer builder: the schedule from the config's `optim` block, AdamW per PEFT label group.

Every task (GRPO, supervised fine-tuning, the benchmarks) builds its optimizer here, so the groups a
method declares in `param_labels` (frozen, LoRA+'s B, LoRA-FA's B) are honoured everywhere.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from jaxrl_peft.peft import optim as peft_optim
from jaxrl_peft.peft.base import PeftMethod

SCHEDULES = ("constant", "cosine", "wsd")
DECAY = ("all", "matrices")


def schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant, cosine decay to `end_learning_rate`
    (default 0) at `total_steps`, or 'wsd' (warmup-stable-decay): constant, then a linear decay to
    `end_learning_rate` over the last `decay_fraction` (default 0.1) of the steps."""
    if o.schedule not in SCHEDULES:
        raise ValueError(f"config optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    if o.learning_rate < 0 or o.warmup_steps < 0:
        raise ValueError(f"config optim.learning_rate ({o.learning_rate}) and optim.warmup_steps "
                         f"({o.warmup_steps}) must be >= 0")
    end = o.get("end_learning_rate", 0.0)
    if o.schedule == "constant":
        main = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "wsd":
        fraction = o.get("decay_fraction", 0.1)
        if not 0 < fraction <= 1:
            raise ValueError(f"config optim.decay_fraction must be in (0, 1], got {fraction}")
        span = max(1, total_steps - o.warmup_steps)
        decay = max(1, round(fraction * span))
        main = optax.join_schedules([optax.constant_schedule(o.learning_rate),
                                     optax.linear_schedule(o.learning_rate, end, decay)], [span - decay])
    else:
        main = optax.cosine_decay_schedule(o.learning_rate, max(1, total_steps - o.warmup_steps),
                                           alpha=end / o.learning_rate if o.learning_rate else 0.0)
    if not o.warmup_steps:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), main],
                                [o.warmup_steps])


def _decay_mask(kind: str):
    if kind not in DECAY:
        raise ValueError(f"config optim.decay must be one of {DECAY}, got {kind!r}")
    if kind == "all":
        return None
    return lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # no decay on gains and biases


def make(method: PeftMethod, adapter: Any, o: ml_collections.ConfigDict, total_steps: int
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for `adapter` under `method` from the config's `optim` block."""
    sched = schedule(o, total_steps)
    tx = peft_optim.make_optimizer(
        method, adapter, sched, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
        loraplus_ratio=o.get("loraplus_ratio", 16.0), grad_clip=o.grad_clip or None,
        decay_mask=_decay_mask(o.get("decay", "all")))
    return tx, sched


def config(**overrides: Any) -> ml_collections.ConfigDict:
    """An `optim` block with every field the builder reads (AdamW defaults), updated by `overrides`."""
    c = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, schedule="constant", warmup_steps=0, end_learning_rate=0.0, weight_decay=0.0,
        decay="all", b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, loraplus_ratio=16.0))
    c.update(overrides)
    return c
