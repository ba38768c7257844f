"""Supervised fine-tuning of the decoder on (prompt, completion) token pairs.

The loss is the mean next-token cross-entropy over completion tokens only (prompt tokens are context,
never targets). Trains one variable collection (`params` for full fine-tuning, `adapter` for a PEFT
method) with optax AdamW; the other collections stay fixed. Batches are drawn by a seeded shuffle,
so a run is a deterministic function of its inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, completion ids)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Optimisation settings; the learning rate warms up linearly, then decays with a cosine to `end_lr`."""

    steps: int = 1000
    batch_size: int = 16  # packed rows per step
    seq_len: int = 256  # tokens per packed row
    learning_rate: float = 1e-3
    end_lr: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedy packing of examples (in the given order) into rows of at most `seq_len` tokens."""
    rows: list[list[int]] = []
    used = seq_len
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {seq_len}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def make_batch(rows: Sequence[Sequence[Example]], pad_id: int, seq_len: int) -> dict[str, np.ndarray]:
    """One row per entry of `rows`, each the concatenation of its (prompt + completion) examples.

    Returns [N, T] arrays: tokens; positions restarting at 0 for every example; segment_ids (1, 2, ...
    per example, 0 on the padding, which attends only to itself); loss_mask, True on completion tokens.
    """
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    positions = np.zeros((n, seq_len), np.int32)
    segments = np.zeros((n, seq_len), np.int32)
    target = np.zeros((n, seq_len), bool)
    for r, row in enumerate(rows):
        at = 0
        for s, (prompt, completion) in enumerate(row, start=1):
            k = len(prompt) + len(completion)
            if at + k > seq_len:
                raise ValueError(f"row {r} holds {at + k} tokens, more than the row length {seq_len}")
            tokens[r, at:at + k] = list(prompt) + list(completion)
            positions[r, at:at + k] = np.arange(k)
            segments[r, at:at + k] = s
            target[r, at + len(prompt):at + k] = True
            at += k
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_mask": target}


def sft_loss(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(mean NLL over target tokens, number of target tokens). logits [N, T, V] predict tokens[:, 1:]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [N, T-1, V]
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [N, T-1]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    count = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(count, 1.0), count


def make_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay and global-norm clipping; no decay on vectors (norms, biases)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1), cfg.end_lr)

    def decay_mask(tree):
        return jax.tree.map(lambda x: x.ndim >= 2, tree)

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, trainable: str = "params"
                    ) -> Callable[..., tuple[Any, Any, Array]]:
    """Jitted `step(train_vars, opt_state, fixed_vars, batch) -> (train_vars, opt_state, loss)`."""

    def loss_fn(train_vars, fixed_vars, batch):
        logits = model.apply({**fixed_vars, trainable: train_vars}, batch["tokens"],
                             positions=batch["positions"], segment_ids=batch["segment_ids"])
        return sft_loss(logits, batch["tokens"], batch["loss_mask"])[0]

    def step(train_vars, opt_state, fixed_vars, batch):
        loss, grads = jax.value_and_grad(loss_fn)(train_vars, fixed_vars, batch)
        updates, opt_state = optimizer.update(grads, opt_state, train_vars)
        return optax.apply_updates(train_vars, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _check(examples: Sequence[Example], seq_len: int) -> list[int]:
    if not examples:
        raise ValueError("sft: no examples")
    lengths = []
    for i, (prompt, completion) in enumerate(examples):
        if not prompt or not completion:
            raise ValueError(f"sft: example {i} needs at least one prompt and one completion token")
        lengths.append(len(prompt) + len(completion))
        if lengths[-1] > seq_len:
            raise ValueError(f"sft: example {i} has {lengths[-1]} tokens, more than seq_len={seq_len}")
    return lengths


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(model: nn.Module, variables: dict, batch: dict) -> tuple[Array, Array]:
    logits = model.apply(variables, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    loss, count = sft_loss(logits, batch["tokens"], batch["loss_mask"])
    return loss * count, count


def evaluate_loss(model: nn.Module, variables: dict, examples: Sequence[Example], pad_id: int,
                  seq_len: int = 256, batch_size: int = 16) -> float:
    """Mean NLL per completion token of `examples` under `variables` (no training)."""
    rows = pack(_check(examples, seq_len), seq_len)
    nll = count = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = [[examples[j] for j in row] for row in rows[i:i + batch_size]]
        chunk += [[]] * (batch_size - len(chunk))  # empty rows: padding only, no targets
        s, c = _nll_sum(model, variables, make_batch(chunk, pad_id, seq_len))
        nll, count = nll + float(s), count + float(c)
    return nll / max(count, 1.0)


def train(model: nn.Module, train_vars: Any, examples: Sequence[Example], cfg: SFTConfig, pad_id: int,
          fixed_vars: dict | None = None, trainable: str = "params",
          log: Callable[[str], None] | None = print) -> tuple[Any, list[float]]:
    """Fine-tunes `train_vars` (the `trainable` collection) on `examples`; returns (trained vars, losses).

    Each epoch shuffles the examples and packs them into rows of `cfg.seq_len` tokens; a step takes
    `cfg.batch_size` rows (one compiled shape). `fixed_vars` holds the other collections, e.g.
    {'params': base} when `trainable='adapter'`.
    """
    lengths = _check(examples, cfg.seq_len)
    fixed_vars = dict(fixed_vars or {})
    optimizer = make_optimizer(cfg)
    step_fn = make_train_step(model, optimizer, trainable)
    train_vars = jax.tree.map(jnp.array, train_vars)  # a private copy: the step donates its buffers
    opt_state = optimizer.init(train_vars)
    rng = np.random.default_rng(cfg.seed)
    rows: list[list[int]] = []
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        while len(rows) < cfg.batch_size:  # refill from the next shuffled epoch(s)
            order = rng.permutation(len(examples))
            rows += [[int(order[j]) for j in row] for row in pack([lengths[j] for j in order], cfg.seq_len)]
        take, rows = rows[:cfg.batch_size], rows[cfg.batch_size:]
        seen += sum(len(r) for r in take)
        batch = make_batch([[examples[j] for j in row] for row in take], pad_id, cfg.seq_len)
        train_vars, opt_state, loss = step_fn(train_vars, opt_state, fixed_vars, batch)
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"sft.train: non-finite loss {losses[-1]} at step {step}")
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            seconds = time.perf_counter() - start
            log(f"sft step {step}/{cfg.steps}  loss {np.mean(losses[-cfg.log_every:]):.4f}  "
                f"epoch {seen / len(examples):.2f}  {seconds:.0f}s  "
                f"{step * cfg.batch_size * cfg.seq_len / seconds:.0f} tok/s")
    return train_vars, losses
