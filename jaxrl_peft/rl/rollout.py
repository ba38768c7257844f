"""The one sampler of both model families: one jitted prefill, one jitted decode loop.

Prompts are left-padded to a common length P. The model's family owns the decode state (the decoder: a
KV cache of P + max_new_tokens slots; RWKV-7: its constant-size recurrent state) and the sampler only
calls its prefill and decode step; the loop (`lax.while_loop`) stops as soon as every row has emitted
one of its stop tokens or used its budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import family as family_lib

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


class Step(NamedTuple):
    """One decoded step of every row (streaming mode); arrays have a leading batch axis."""

    index: int  # 0-based step
    tokens: np.ndarray  # [B] int32, pad where the row is not active
    logprobs: np.ndarray  # [B] f32
    logits: np.ndarray  # [B, V] f32: the logits the token was drawn from
    active: np.ndarray  # [B] bool: the row emitted this token (not finished before the step)


class Sampler:
    """Generates continuations of left-padded prompts with a model of either family and any
    parameter/adapter tree.

    `model` is a `family.Family` (element 0 of `family.load(...)`) or a bare module a family wraps
    (`tfm.Transformer`, RWKV-7). `sampler(variables, prompt_tokens [B, P], prompt_mask [B, P], key)`
    returns a `Rollout` (with `return_state=True`, also the decode state after each row's last token);
    `sampler.stream(..., on_step)` decodes step by step and calls `on_step(Step)` after each one (chat).
    Row r draws its randomness from fold_in(key, row_ids[r]), so a prompt gets the same sample
    whether it is alone or in a batch at the same row id.
    """

    def __init__(self, model: Any, sampling: SamplingConfig, pad_id: int,
                 stop_tokens: Sequence[int] = (), mesh: Mesh | None = None, cache_dtype: Any = None):
        family = family_lib.of(model)
        if cache_dtype is not None and isinstance(family, family_lib.DecoderFamily):
            family = dataclasses.replace(family, cache_dtype=cache_dtype)
        self.family = family
        self.model = family.module
        self.sampling = sampling
        self.pad_id = int(pad_id)
        self.stop_tokens = tuple(int(t) for t in stop_tokens)
        self.mesh = mesh
        self._prefill = jax.jit(self._prefill_fn)
        self._decode = jax.jit(self._decode_fn)
        self._start = jax.jit(self._start_fn)
        self._step = jax.jit(self._step_fn)

    def _constrain_state(self, state: Any) -> Any:
        if self.mesh is None:
            return state
        treedef = jax.tree.structure(state)
        axes = treedef.flatten_up_to(self.family.state_axes(state))  # one axis-name tuple per state leaf
        return jax.lax.with_sharding_constraint(
            state, treedef.unflatten([mesh_lib.logical_sharding(P(*a), self.mesh) for a in axes]))

    def _prefill_fn(self, variables, tokens, mask, embeddings, state):
        b, p = tokens.shape
        if state is None:
            state = self.family.init_state(b, p + self.sampling.max_new_tokens)
        state = self._constrain_state(state)
        logits, state = self.family.prefill(variables, state, tokens, mask, embeddings=embeddings)
        return logits, self._constrain_state(state)

    def _start_fn(self, logits, key, budgets, row_ids):
        """The decode loop's carry before step 0."""
        b, n = logits.shape[0], self.sampling.max_new_tokens
        row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
        return (jnp.int32(0), logits, jnp.full((b, n), self.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
                jnp.zeros((b, n), jnp.bool_), budgets <= 0, jnp.zeros((b,), jnp.bool_), row_keys)

    def _step_fn(self, variables, state, carry, stop_tokens, budgets):
        """Draws one token per row from `logits`, records it, feeds it: returns (state, carry, the step's
        (tokens, logprobs, drawn-from logits, active))."""
        step, logits, out_tokens, out_logp, out_mask, done, stopped, row_keys = carry
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        token, logp = sample_tokens(logits, keys, self.sampling)
        active = ~done
        token = jnp.where(active, token, self.pad_id)
        logp = jnp.where(active, logp, 0.0)
        out_tokens = jax.lax.dynamic_update_slice(out_tokens, token[:, None], (0, step))
        out_logp = jax.lax.dynamic_update_slice(out_logp, logp[:, None], (0, step))
        out_mask = jax.lax.dynamic_update_slice(out_mask, active[:, None], (0, step))
        hit = active & jnp.any(token[:, None] == stop_tokens, axis=-1)
        stopped = stopped | hit
        done = done | hit | (step + 1 >= budgets)
        new_logits, state = self.family.decode_step(variables, state, token, active)
        state = self._constrain_state(state)
        carry = (step + 1, new_logits, out_tokens, out_logp, out_mask, done, stopped, row_keys)
        return state, carry, (token, logp, logits, active)

    def _decode_fn(self, variables, state, logits, key, stop_tokens, budgets, row_ids):
        n = self.sampling.max_new_tokens

        def cond(loop_state):
            _, (step, *_, done, _, _) = loop_state
            return (step < n) & ~jnp.all(done)

        def body(loop_state):
            state, carry = loop_state
            state, carry, _ = self._step_fn(variables, state, carry, stop_tokens, budgets)
            return state, carry

        carry = self._start_fn(logits, key, budgets, row_ids)
        state, carry = jax.lax.while_loop(cond, body, (state, carry))
        return _rollout(carry), state

    def _inputs(self, prompt_tokens, prompt_mask, stop_tokens, budgets, row_ids, embeddings=None,
                state=None) -> tuple[Any, ...]:
        """Checked, defaulted and placed (sharded with a mesh) arguments of one call."""
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens, np.int32), np.asarray(prompt_mask, np.bool_)
        if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
            raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask {prompt_mask.shape} "
                             "must both be [batch, prompt_len]")
        if embeddings is not None and tuple(embeddings.shape[:2]) != prompt_tokens.shape:
            raise ValueError(f"embeddings {tuple(embeddings.shape)} must be [batch, prompt_len, dim] with "
                             f"[batch, prompt_len] = {prompt_tokens.shape}")
        if state is not None and not self.family.continues_state:
            raise ValueError(f"the {self.family.name} family cannot continue from a previous call's state "
                             "(its decode state grows with the sequence): feed the whole conversation instead")
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
            if embeddings is not None and not isinstance(embeddings, jax.Array):
                embeddings = mesh_lib.host_batch(np.asarray(embeddings), self.mesh)
        else:
            inputs = tuple(jnp.asarray(x) for x in inputs)
        return (*inputs, embeddings, state)

    def __call__(self, variables: dict, prompt_tokens: Array, prompt_mask: Array, key: Array,
                 stop_tokens: Array | None = None, budgets: Array | None = None,
                 row_ids: Array | None = None, return_state: bool = False, embeddings: Array | None = None,
                 state: Any = None) -> Rollout | tuple[Rollout, Any]:
        """stop_tokens: [B, S] per-row stop ids (pad with -1), default the sampler's list for every row;
        budgets: [B] per-row maximum new tokens (<= max_new_tokens); row_ids: [B] RNG stream per row
        (default: the row's index in the global batch). return_state: also return the decode state after
        each row's last token (RWKV-7: exactly; a finished row's state stops at its stop token).
        embeddings: [B, P, D] input embeddings fed in place of the prompt tokens' (multimodal prompts: the
        encoder outputs spliced in); the tokens still say which ids the positions hold.
        state: start from this decode state instead of an empty one (a previous call's returned state:
        the next turn of a chat feeds only its new tokens); families with `continues_state` only.

        With a mesh, the arguments are this host's rows (every host calls with the same number of rows;
        with one process, all rows) and the returned arrays are the global batch, sharded over the
        batch axes: `mesh.local_rows` gives this host's rows back."""
        prompt_tokens, prompt_mask, stop_tokens, budgets, row_ids, embeddings, state = self._inputs(
            prompt_tokens, prompt_mask, stop_tokens, budgets, row_ids, embeddings, state)
        logits, state = self._prefill(variables, prompt_tokens, prompt_mask, embeddings, state)
        out, state = self._decode(variables, state, logits, key, stop_tokens, budgets, row_ids)
        return (out, state) if return_state else out

    def stream(self, variables: dict, prompt_tokens: Array, prompt_mask: Array, key: Array,
               on_step: Callable[[Step], None], stop_tokens: Array | None = None,
               budgets: Array | None = None, row_ids: Array | None = None, embeddings: Array | None = None,
               state: Any = None) -> tuple[Rollout, Any]:
        """Like `__call__(..., return_state=True)` (the same tokens), one jitted step at a time: calls
        `on_step(Step)` after each decoded step (host arrays), for chat and for inspecting logits."""
        prompt_tokens, prompt_mask, stop_tokens, budgets, row_ids, embeddings, state = self._inputs(
            prompt_tokens, prompt_mask, stop_tokens, budgets, row_ids, embeddings, state)
        logits, state = self._prefill(variables, prompt_tokens, prompt_mask, embeddings, state)
        carry = self._start(logits, key, budgets, row_ids)
        for index in range(self.sampling.max_new_tokens):
            if bool(jnp.all(carry[5])):
                break
            state, carry, (token, logp, drawn_from, active) = self._step(variables, state, carry, stop_tokens,
                                                                         budgets)
            on_step(Step(index, *jax.device_get((token, logp, drawn_from, active))))
        return _rollout(carry), state


def _rollout(carry: tuple) -> Rollout:
    """The Rollout a decode carry holds."""
    _, _, out_tokens, out_logp, out_mask, _, stopped, _ = carry
    return Rollout(out_tokens, out_logp, out_mask, jnp.sum(out_mask, axis=1, dtype=jnp.int32), stopped)


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
