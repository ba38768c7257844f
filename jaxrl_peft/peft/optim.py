"""The optimizer for an adapter tree: AdamW per label group (optax.multi_transform).

Groups (from `registry.labels`): 'default' AdamW at lr; 'lora_b' (LoRA+) AdamW at lr * loraplus_ratio;
'frozen' nothing (set_to_zero: no optimizer state); 'lorafa' (LoRA-FA's B) the projected gradient
(1/s^2) (A A^T + 1e-8 I)^+ g_B followed by PEFT LoraFAOptimizer's AdamW step.
Order, as in a torch training step: frozen gradients dropped -> global-norm clip -> LoRA-FA projection ->
per-group update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod

Schedule = float | Callable[[Any], Any]
KNOWN_LABELS = ("default", "lora_b", "frozen", "lorafa")


def _scaled(learning_rate: Schedule, ratio: float) -> Schedule:
    if callable(learning_rate):
        return lambda count: ratio * learning_rate(count)
    return learning_rate * ratio


def _map_modules(fn: Callable[[dict, dict], dict], tree: dict, params: dict) -> dict:
    """Applies fn(module_updates, module_params) to the leaves of every module dict."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    out = dict(fn(leaves, {k: params[k] for k in leaves})) if leaves else {}
    out.update({k: _map_modules(fn, v, params[k]) for k, v in tree.items() if isinstance(v, dict)})
    return out


def drop_frozen(labels: dict) -> optax.GradientTransformation:
    """Zeroes the gradients of 'frozen' leaves, so that clipping sees only what trains (as torch does)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda g, lab: jnp.zeros_like(g) if lab == "frozen" else g, updates, labels), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _preconditions(method: PeftMethod) -> bool:
    """Whether `method` (or a part of a composite) preconditions gradients."""
    names = method.part_names()
    if names is not None:
        return any(_preconditions(method.part(name)) for name in names)
    return type(method).precondition is not PeftMethod.precondition


def _precondition_tree(method: PeftMethod, updates: dict, params: dict) -> dict:
    """`method.precondition` on every module of `updates`; a composite's parts each by their own method."""
    if method.part_names() is not None:
        return {k: _precondition_tree(method.part(k), v, params[k]) for k, v in updates.items()}
    if not _preconditions(method):
        return updates
    return _map_modules(method.precondition, updates, params)


def precondition(method: PeftMethod) -> optax.GradientTransformation:
    """Calls `method.precondition(module_grads, module_params)` on every module (LoRA-FA); needs params."""
    if not _preconditions(method):
        return optax.identity()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(f"PEFT method {method.name!r}: the optimizer update needs the adapter params "
                             "(call tx.update(grads, state, adapter))")
        return _precondition_tree(method, updates, params), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class HFAdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def hf_adamw(learning_rate: Schedule, b1: float, b2: float, eps: float, weight_decay: float
             ) -> optax.GradientTransformation:
    """The AdamW step of PEFT's LoraFAOptimizer (transformers' AdamW):

    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps); then p -= lr * wd * p (the updated p).
    """
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return HFAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        t = count.astype(jnp.float32)
        step_size = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        new = jax.tree.map(lambda m, v: -step_size * m / (jnp.sqrt(v) + eps), mu, nu)
        if weight_decay:
            if params is None:
                raise ValueError("hf_adamw with weight decay needs the params in update()")
            new = jax.tree.map(lambda u, p: u - lr * weight_decay * (p + u), new, params)
        return new, HFAdamState(count, mu, nu)
    return optax.GradientTransformation(init, update)


def make_optimizer(method: PeftMethod, adapter: dict, learning_rate: Schedule, *, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, loraplus_ratio: float = 16.0,
                   grad_clip: float | None = None, decay_mask: Any = None) -> optax.GradientTransformation:
    """The optax optimizer for `adapter` under `method` (learning_rate: a float or an optax schedule).

    Use as `tx.update(grads, opt_state, adapter)`: the adapter params are required (LoRA-FA, decay).
    PEFT's LoRA-FA default eps is 1e-6 (pass eps=1e-6 for its exact update). `decay_mask` (a function
    of the params tree, as optax.adamw takes) limits weight decay, e.g. to matrices.
    """
    if loraplus_ratio <= 0:
        raise ValueError(f"loraplus_ratio must be > 0, got {loraplus_ratio}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    labels = registry.labels(method, adapter)
    present = sorted(set(jax.tree.leaves(labels)))
    unknown = [lab for lab in present if lab not in KNOWN_LABELS]
    if unknown:
        raise ValueError(f"PEFT method {method.name!r} labels adapter leaves {unknown}; the optimizer knows "
                         f"{list(KNOWN_LABELS)}")
    adamw = lambda lr: optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,  # noqa: E731
                                   mask=decay_mask)
    groups = {
        "default": lambda: adamw(learning_rate),
        "lora_b": lambda: adamw(_scaled(learning_rate, loraplus_ratio)),
        "frozen": optax.set_to_zero,
        "lorafa": lambda: hf_adamw(learning_rate, b1, b2, eps, weight_decay),
    }
    chain = [drop_frozen(labels)]
    if grad_clip is not None:
        chain.append(optax.clip_by_global_norm(grad_clip))
    chain.append(precondition(method))
    chain.append(optax.multi_transform({lab: groups[lab]() for lab in present}, labels))
    return optax.chain(*chain)
