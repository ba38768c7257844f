"""Batched sampling over a preallocated KV cache: one jitted prefill, one jitted decode loop.

Prompts are left-padded to a common length P. The cache holds P + max_new_tokens slots; the decode
loop (`lax.while_loop`) stops as soon as every row has emitted one of its stop tokens or used its budget.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import transformer as tfm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


class Rollout(NamedTuple):
    """Generated continuations; every array has a leading batch axis."""

    tokens: Array  # [B, N] int32, pad after the end
    logprobs: Array  # [B, N] f32: log-prob of each sampled token under softmax(logits / temperature)
    mask: Array  # [B, N] bool: True for generated tokens (the stop token included)
    lengths: Array  # [B] int32
    finished: Array  # [B] bool: emitted a stop token (False: cut by the budget)


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits: [B, V] f32."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
        keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1
        threshold = jnp.take_along_axis(desc, keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample_tokens(logits: Array, keys: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
    """Draws one token per row (row r uses keys[r]); returns (tokens [B], logprobs [B])."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / cfg.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        filtered = filter_logits(scaled, cfg.top_k, cfg.top_p)
        tokens = jax.vmap(jax.random.categorical)(keys, filtered)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


class Sampler:
    """Generates continuations of left-padded prompts with a model and any parameter/adapter tree.

    `sampler(variables, prompt_tokens [B, P], prompt_mask [B, P], key)` returns a `Rollout`.
    Row r draws its randomness from fold_in(key, row_ids[r]), so a prompt gets the same sample
    whether it is alone or in a batch at the same row id.
    """

    def __init__(self, model: tfm.Transformer, sampling: SamplingConfig, pad_id: int,
                 stop_tokens: Sequence[int] = (), mesh: Mesh | None = None, cache_dtype: Any = None):
        self.model = model
        self.sampling = sampling
        self.pad_id = int(pad_id)
        self.stop_tokens = tuple(int(t) for t in stop_tokens)
        self.mesh = mesh
        self.cache_dtype = cache_dtype
        self._prefill = jax.jit(self._prefill_fn)
        self._decode = jax.jit(self._decode_fn)

    def _constrain_cache(self, cache):
        if self.mesh is None:
            return cache
        sharding = mesh_lib.logical_sharding(tfm.CACHE_AXES, self.mesh)
        return jax.lax.with_sharding_constraint(cache, jax.tree.map(lambda _: sharding, cache))

    def _prefill_fn(self, variables, tokens, mask):
        b, p = tokens.shape
        cache = tfm.init_cache(self.model.cfg, b, p + self.sampling.max_new_tokens, self.cache_dtype)
        cache = self._constrain_cache(cache)
        kv_mask = jnp.concatenate([mask, jnp.ones((b, self.sampling.max_new_tokens), jnp.bool_)], axis=1)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, cache = self.model.apply(variables, tokens, positions=positions, cache=cache,
                                         cache_index=0, kv_mask=kv_mask)
        return cache, logits[:, -1].astype(jnp.float32), kv_mask

    def _decode_fn(self, variables, cache, logits, kv_mask, prompt_lens, key, stop_tokens, budgets, row_ids):
        b = logits.shape[0]
        n = self.sampling.max_new_tokens
        p = kv_mask.shape[1] - n
        out_tokens = jnp.full((b, n), self.pad_id, jnp.int32)
        out_logp = jnp.zeros((b, n), jnp.float32)
        out_mask = jnp.zeros((b, n), jnp.bool_)
        done = budgets <= 0
        stopped = jnp.zeros((b,), jnp.bool_)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)

        def cond(state):
            step, *_, done, _ = state
            return (step < n) & ~jnp.all(done)

        def body(state):
            step, cache, logits, out_tokens, out_logp, out_mask, done, stopped = state
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
            token, logp = sample_tokens(logits, keys, self.sampling)
            active = ~done
            token = jnp.where(active, token, self.pad_id)
            out_tokens = jax.lax.dynamic_update_slice(out_tokens, token[:, None], (0, step))
            out_logp = jax.lax.dynamic_update_slice(out_logp, jnp.where(active, logp, 0.0)[:, None], (0, step))
            out_mask = jax.lax.dynamic_update_slice(out_mask, active[:, None], (0, step))
            hit = active & jnp.any(token[:, None] == stop_tokens, axis=-1)
            stopped = stopped | hit
            done = done | hit | (step + 1 >= budgets)
            new_logits, cache = self.model.apply(
                variables, token[:, None], positions=(prompt_lens + step)[:, None], cache=cache,
                cache_index=p + step, kv_mask=kv_mask)
            return (step + 1, cache, new_logits[:, 0].astype(jnp.float32), out_tokens, out_logp, out_mask,
                    done, stopped)

        state = (jnp.int32(0), cache, logits, out_tokens, out_logp, out_mask, done, stopped)
        _, _, _, out_tokens, out_logp, out_mask, _, stopped = jax.lax.while_loop(cond, body, state)
        return Rollout(out_tokens, out_logp, out_mask, jnp.sum(out_mask, axis=1, dtype=jnp.int32), stopped)

    def __call__(self, variables: dict, prompt_tokens: Array, prompt_mask: Array, key: Array,
                 stop_tokens: Array | None = None, budgets: Array | None = None,
                 row_ids: Array | None = None) -> Rollout:
        """stop_tokens: [B, S] per-row stop ids (pad with -1), default the sampler's list for every row;
        budgets: [B] per-row maximum new tokens (<= max_new_tokens); row_ids: [B] RNG stream per row
        (default: the row's index in the global batch).

        With a mesh, the arguments are this host's rows (every host calls with the same number of rows;
        with one process, all rows) and the returned arrays are the global batch, sharded over the
        batch axes: `mesh.local_rows` gives this host's rows back."""
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens, np.int32), np.asarray(prompt_mask, np.bool_)
        if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
            raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} "
                             "must both be [batch, prompt_len]")
        b = prompt_tokens.shape[0]
        n = self.sampling.max_new_tokens
        if stop_tokens is None:
            stop_tokens = np.tile(np.asarray(self.stop_tokens or (-1,), np.int32), (b, 1))
        stop_tokens = np.asarray(stop_tokens, np.int32).reshape(b, -1)
        budgets = np.full((b,), n, np.int32) if budgets is None else np.minimum(np.asarray(budgets, np.int32), n)
        offset = jax.process_index() * b if self.mesh is not None else 0
        row_ids = offset + np.arange(b, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
        inputs = (prompt_tokens, prompt_mask, stop_tokens, budgets, row_ids)
        if self.mesh is not None:
            inputs = tuple(mesh_lib.host_batch(x, self.mesh) for x in inputs)
        else:
            inputs = tuple(jnp.asarray(x) for x in inputs)
        prompt_tokens, prompt_mask, stop_tokens, budgets, row_ids = inputs
        cache, logits, kv_mask = self._prefill(variables, prompt_tokens, prompt_mask)
        prompt_lens = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
        return self._decode(variables, cache, logits, kv_mask, prompt_lens, key, stop_tokens, budgets, row_ids)


def decode_completions(tokenizer: Any, out: Rollout, rows: int | None = None) -> list[str]:
    """The text of each sampled completion without its stop token ('Answer: 42<eos>' reads 'Answer: 42'),
    for the first `rows` rows (default all). `out` holds numpy arrays (this host's rows)."""
    n = len(out.lengths) if rows is None else rows
    return [tokenizer.decode(out.tokens[i][:int(out.lengths[i]) - int(out.finished[i])]) for i in range(n)]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length: returns (tokens [B, P], mask [B, P])."""
    length = length or max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for i, s in enumerate(sequences):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {length}")
        if len(s):
            tokens[i, length - len(s):] = s
            mask[i, length - len(s):] = True
    return tokens, mask
