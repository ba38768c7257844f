"""RWKV-7 "x070" in Flax linen, as the official reference (rwkv pip `RWKV_x070`) computes it.

Two modes with the same numbers: parallel (training, prefill; the WKV7 kernel) and recurrent (one
token at a time, constant-size state), both able to skip masked (left-padding) steps exactly; official
`.pth` / safetensors loading; `RWKV7Family`, this family's side of `jaxrl_peft.models.family` (the
shared sampler decodes with it). Parameter names follow the official checkpoint: block 0 is `blocks_0`
(`blocks_0/att/receptance/kernel` is `blocks.0.att.receptance.weight` transposed) and blocks 1 ... L-1
are stacked under `blocks` for nn.scan (`blocks/att/receptance/kernel[i - 1]` is block i's); the
per-layer PEFT paths are `blocks_<i>/...` in either layout (jaxrl_peft.peft.registry). Files on disk keep
the official one-tensor-per-block layout (`params_from_official` stacks, `params_to_official` unstacks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import family as family_lib, hf, safetensors_io
from jaxrl_peft.models.layers import chunked_token_logprobs, Embed, LayerNorm, Linear, adapted_gain
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod
from rwkv_jax.kernels.wkv7 import wkv7

Dtype = Any
Params = dict[str, Any]

DECAY_SCALE = math.exp(-0.5)  # log decay = -e^{-0.5} * sigmoid(d), so the decay lies in (0.545, 1)
GROUP_NORM_EPS = 64e-5  # ln_x eps of the official code (head size 64 * 1e-5)
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Module paths of the projections, for a PEFT method's `target_modules` (matched as '*/<path>').
LINEAR_MODULES = ("att/receptance", "att/key", "att/value", "att/output", "ffn/key", "ffn/value")
LOW_RANK_MODULES = ("att/w1", "att/w2", "att/a1", "att/a2", "att/v1", "att/v2", "att/g1", "att/g2")
_ARCH_FIELDS = ("vocab_size", "n_embd", "n_layer", "head_size", "dim_ffn", "decay_lora", "iclr_lora",
                "value_lora", "gate_lora")


@dataclasses.dataclass(frozen=True)
class RWKV7Config:
    """Architecture (widths as stored in the checkpoint) plus compute/parameter dtypes."""

    vocab_size: int = 65536
    n_embd: int = 768
    n_layer: int = 12
    head_size: int = 64
    dim_ffn: int = 3072
    decay_lora: int = 64
    iclr_lora: int = 64
    value_lora: int = 32
    gate_lora: int = 128
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise each block in the backward pass (training memory)
    # Blocks 1 ... L-1 under nn.scan with stacked parameters (compile time independent of depth); False
    # unrolls them into blocks_1 ... blocks_{L-1} (the layout per-layer PEFT targets give).
    scan_layers: bool = True

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def arch_dict(self) -> dict[str, int]:
        """The architecture fields, as written to config.json."""
        return {f: getattr(self, f) for f in _ARCH_FIELDS}


# Released shapes, for benchmarks on random weights (checkpoints carry their own: `detect_config`).
PRESETS: dict[str, RWKV7Config] = {
    "rwkv7-0.1b": RWKV7Config(),
    "rwkv7-1.5b": RWKV7Config(n_embd=2048, n_layer=24, dim_ffn=8192, decay_lora=96, iclr_lora=96,
                              value_lora=64, gate_lora=256),
}


def preset(name: str, **overrides: Any) -> RWKV7Config:
    """The config of a released shape (`PRESETS`), with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown RWKV-7 preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class RWKV7State(NamedTuple):
    """Recurrent state of all layers; its size does not depend on the sequence length."""

    att_x_prev: jax.Array  # [L, B, C] last ln1 output, for the time-mix token shift
    wkv: jax.Array  # [L, B, H, K, V] fp32 WKV state
    ffn_x_prev: jax.Array  # [L, B, C] last ln2 output, for the channel-mix token shift


def init_state(config: RWKV7Config, batch_size: int) -> RWKV7State:
    """The zero state the official code starts every sequence from."""
    L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
    return RWKV7State(att_x_prev=jnp.zeros((L, batch_size, C), config.dtype),
                      wkv=jnp.zeros((L, batch_size, H, N, N), jnp.float32),
                      ffn_x_prev=jnp.zeros((L, batch_size, C), config.dtype))


# ------------------------------------------------------------------------------------------------
# WKV7 recurrence (recurrent mode); the parallel mode calls rwkv_jax.kernels.wkv7.wkv7.


def wkv7_step(state: jax.Array, r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array,
              a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One WKV7 step in fp32: S = S*exp(w) + b (a^T S) + k v^T, y = S^T r.

    state [B, H, K, V]; r, w (log decay), k, a, b [B, H, K]; v [B, H, V]. Returns (y [B, H, V], S).
    """
    r, w, k, v, a, b = (t.astype(jnp.float32) for t in (r, w, k, v, a, b))
    sa = jnp.sum(a[..., :, None] * state, axis=-2)  # [B, H, V]
    state = (state * jnp.exp(w)[..., :, None] + b[..., :, None] * sa[..., None, :]
             + k[..., :, None] * v[..., None, :])
    y = jnp.sum(r[..., :, None] * state, axis=-2)  # [B, H, V]
    return y, state


def wkv7_recurrent(r: jax.Array, w: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array,
                   b: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """WKV7 over [B, T, H, N] inputs, one step at a time; returns (y [B, T, H, V] fp32, final state)."""
    if r.shape[1] == 1:
        y, state = wkv7_step(state, r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0])
        return y[:, None], state

    def body(s, xs):
        y, s = wkv7_step(s, *xs)
        return s, y

    xs = tuple(jnp.moveaxis(t, 1, 0) for t in (r, w, k, v, a, b))  # [T, B, H, N]
    state, y = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(y, 0, 1), state


def _wkv7_parallel(r, w, k, v, a, b, state):
    return wkv7(r, w, k, v, a, b, initial_state=state)


def token_shift(x: jax.Array, x_prev: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The previous real token's value at every position: x [B, T, C], x_prev [B, C] -> [B, T, C].

    With a left-padding `mask` [B, T] (False on pads), a position after a pad sees `x_prev`, as if
    the pads were not there.
    """
    prev = jnp.concatenate([x_prev[:, None].astype(x.dtype), x[:, :-1]], axis=1)  # [B, T, C]
    if mask is None:
        return prev
    prev_real = jnp.concatenate([jnp.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)  # [B, T]
    return jnp.where(prev_real[..., None], prev, x_prev[:, None].astype(x.dtype))


def last_real(x: jax.Array, x_prev: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The new token-shift state: the last position's value, or `x_prev` when it is masked."""
    if mask is None:
        return x[:, -1]
    return jnp.where(mask[:, -1:], x[:, -1], x_prev.astype(x.dtype))


# ------------------------------------------------------------------------------------------------
# Initialisers (the official train_temp init; only used by model.init, checkpoints overwrite them).


def _ratio_mix(power: float):
    """1 - (c/C)^power along the channel axis (token-shift mixes)."""
    def init(key, shape, dtype=jnp.float32):
        del key
        c = jnp.arange(shape[-1], dtype=jnp.float32) / shape[-1]
        return (1.0 - c ** power).astype(dtype)
    return init


def _const(fn):
    """An initializer computed from the channel axis alone: fn(n, C) -> [C]."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.broadcast_to(fn(jnp.arange(shape[-1], dtype=jnp.float32), shape[-1]),
                                shape).astype(dtype)
    return init


def _sym_uniform(bound: float):
    """U(-bound, bound)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _zigzag(n, N):
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    return z * jnp.abs(z)


# ------------------------------------------------------------------------------------------------
# Modules.


class GroupNorm(nn.Module):
    """ln_x: GroupNorm with one group per head in fp32, affine over all C channels.

    Like `LayerNorm`, its gain goes through the PEFT method when the adapter holds an entry for it.
    """

    eps: float = GROUP_NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    peft: PeftMethod | None = None
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., H, N] -> [..., H*N]."""
        d = x.shape[-2] * x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(self.scale_init, ("norm",)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (d,), self.param_dtype)
        scale = adapted_gain(self, scale)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(*x.shape[:-2], d)  # [..., C]
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class TimeMix(nn.Module):
    """RWKV-7 time mixing (`att`): token shift, low-rank decay/iclr/value/gate MLPs, WKV7, ln_x.

    `first`: layer 0, whose value is v_first; the later layers mix v_first into theirs (v0, v1, v2).
    """

    config: RWKV7Config
    first: bool = False
    peft: PeftMethod | None = None

    def _linear(self, name: str, features: int, axes: tuple[str, str], init=None) -> Linear:
        cfg = self.config
        kw = {} if init is None else {"kernel_init": init}
        return Linear(features, axes=axes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      peft=self.peft, name=name, **kw)

    def _vector(self, name: str, init, shape=None) -> jax.Array:
        shape = shape or (self.config.n_embd,)
        p = self.param(name, nn.with_logical_partitioning(init, (None,) * len(shape)), shape,
                       self.config.param_dtype)
        return p.astype(self.config.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, x_prev: jax.Array, wkv: jax.Array, v_first: jax.Array | None,
                 layer_id: jax.Array | int, recurrent: bool, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """x [B, T, C] (ln1 output), x_prev [B, C], wkv [B, H, K, V], mask [B, T] (False: a step that
        leaves the state unchanged, i.e. left padding). `layer_id` (traced under nn.scan) only enters
        the initialisers.

        Returns (out [B, T, C], new x_prev, new wkv, v_first).
        """
        cfg, l = self.config, layer_id
        B, T, C = x.shape
        H, N = cfg.n_head, cfg.head_size
        L = cfg.n_layer
        r01 = l / max(L - 1, 1)
        r10 = 1.0 - l / L
        lin = lambda n, C_: n / max(C_ - 1, 1) - 0.5  # noqa: E731
        ortho = nn.initializers.orthogonal(0.1)

        xx = token_shift(x, x_prev, mask) - x  # [B, T, C]
        xr, xw, xk, xv, xa, xg = (x + xx * self._vector(f"x_{n}", _ratio_mix(p * r10)) for n, p in
                                  zip("rwkvag", (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)))

        w0 = self._vector("w0", _const(lambda n, C_: -6 + 6 * (n / (C_ - 1)) ** (1 + r01 ** 0.3)
                                       + 0.5 + 2.5 * _zigzag(n, N)))
        a0 = self._vector("a0", _const(lambda n, C_: -0.19 + 0.3 * _zigzag(n, N) + 0.4 * lin(n, C_)))
        k_k = self._vector("k_k", _const(lambda n, C_: 0.71 - 0.1 * lin(n, C_)))
        k_a = self._vector("k_a", nn.initializers.constant(1.02))
        r_k = self._vector("r_k", nn.initializers.constant(-0.04), (H, N))

        r = self._linear("receptance", C, ("embed", "heads"), _sym_uniform(0.5 / math.sqrt(C)))(xr)
        k = self._linear("key", C, ("embed", "heads"), _sym_uniform(0.05 / math.sqrt(C)))(xk)
        v = self._linear("value", C, ("embed", "heads"), _sym_uniform(0.5 / math.sqrt(C)))(xv)
        d = w0 + self._linear("w2", C, ("rank", "heads"), ortho)(
            jnp.tanh(self._linear("w1", cfg.decay_lora, ("embed", "rank"), nn.initializers.zeros)(xw)))
        a = jax.nn.sigmoid(a0 + self._linear("a2", C, ("rank", "heads"), ortho)(
            self._linear("a1", cfg.iclr_lora, ("embed", "rank"), nn.initializers.zeros)(xa)))
        g = self._linear("g2", C, ("rank", "heads"), ortho)(
            jax.nn.sigmoid(self._linear("g1", cfg.gate_lora, ("embed", "rank"),
                                        nn.initializers.zeros)(xg)))
        if self.first:
            v_first = v
        else:
            v0 = self._vector("v0", _const(lambda n, C_: 0.73 - 0.4 * lin(n, C_)))
            gate = jax.nn.sigmoid(v0 + self._linear("v2", C, ("rank", "heads"), ortho)(
                self._linear("v1", cfg.value_lora, ("embed", "rank"), nn.initializers.zeros)(xv)))
            v = v + (v_first - v) * gate

        kk = (k * k_k).reshape(B, T, H, N)
        kk = kk / jnp.maximum(jnp.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)  # F.normalize
        kk = kk.reshape(B, T, C)
        k = k * (1 + (a - 1) * k_a)
        log_w = -DECAY_SCALE * jax.nn.sigmoid(d.astype(jnp.float32))

        heads = lambda t: t.astype(x.dtype).reshape(B, T, H, N)  # noqa: E731  [B, T, H, N]
        wkv_k, wkv_b = k, kk * a
        if mask is not None:  # a masked step: decay 1, nothing written (S stays S exactly)
            keep = mask[..., None]  # [B, T, 1]
            log_w, wkv_k, wkv_b = (jnp.where(keep, t, 0) for t in (log_w, wkv_k, wkv_b))
        wkv_in = (heads(r), heads(log_w), heads(wkv_k), heads(v), heads(-kk), heads(wkv_b))
        if recurrent:
            y, wkv = wkv7_recurrent(*wkv_in, wkv)
        else:
            y, wkv = _wkv7_parallel(*wkv_in, wkv.astype(jnp.float32))

        y = GroupNorm(dtype=jnp.float32, param_dtype=cfg.param_dtype, peft=self.peft, name="ln_x",
                      scale_init=nn.initializers.constant(((l + 1) / L) ** 0.7))(y)  # [B, T, C]
        bonus = jnp.sum(heads(r * k).astype(jnp.float32) * r_k.astype(jnp.float32), axis=-1,
                        keepdims=True) * heads(v).astype(jnp.float32)  # [B, T, H, N]
        y = (y + bonus.reshape(B, T, C)).astype(cfg.dtype)
        out = self._linear("output", C, ("heads", "embed"), nn.initializers.zeros)(y * g)
        return out, last_real(x, x_prev, mask), wkv.astype(jnp.float32), v_first


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing (`ffn`): token shift, squared-ReLU MLP, no receptance gate."""

    config: RWKV7Config
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array, x_prev: jax.Array, layer_id: jax.Array | int,
                 mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, C] (ln2 output), x_prev [B, C], mask [B, T] -> (out [B, T, C], new x_prev)."""
        cfg = self.config
        r10 = 1.0 - layer_id / cfg.n_layer
        x_k = self.param("x_k", nn.with_logical_partitioning(_ratio_mix(r10 ** 4), (None,)),
                         (cfg.n_embd,), cfg.param_dtype).astype(cfg.dtype)
        xx = token_shift(x, x_prev, mask) - x  # [B, T, C]
        h = Linear(cfg.dim_ffn, axes=("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   peft=self.peft, kernel_init=_sym_uniform(0.5 / math.sqrt(cfg.n_embd)),
                   name="key")(x + xx * x_k)
        h = jnp.square(jax.nn.relu(h))
        out = Linear(cfg.n_embd, axes=("mlp", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     peft=self.peft, kernel_init=nn.initializers.zeros, name="value")(h)
        return out, last_real(x, x_prev, mask)


class Block(nn.Module):
    """One RWKV-7 layer: (ln0 on layer 0), x += att(ln1(x)), x += ffn(ln2(x)).

    `first`: layer 0 (ln0; its value is v_first). `layer_id` (an int, or traced under nn.scan) only
    enters the official initialisers.
    """

    config: RWKV7Config
    first: bool = False
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x, att_x_prev, wkv, ffn_x_prev, v_first, layer_id, recurrent: bool, mask=None):
        cfg = self.config
        norm = lambda name: LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype,  # noqa: E731
                                      peft=self.peft, name=name)
        if self.first:
            x = norm("ln0")(x)
        h, att_x_prev, wkv, v_first = TimeMix(cfg, self.first, self.peft, name="att")(
            norm("ln1")(x), att_x_prev, wkv, v_first, layer_id, recurrent, mask)
        x = x + h
        h, ffn_x_prev = ChannelMix(cfg, self.peft, name="ffn")(norm("ln2")(x), ffn_x_prev, layer_id, mask)
        return x + h, att_x_prev, wkv, ffn_x_prev, v_first


# The stacked subtree of blocks 1 ... L-1 (block 0 differs: ln0, no value residual; it stays `blocks_0`).
STACK = "blocks"
_REMAT_STATIC = (7,)  # Block.__call__'s `recurrent` (self counts as 0)


class RWKV7(nn.Module):
    """The RWKV-7 language model: emb -> blocks -> ln_out -> head.

    `apply(vars, tokens [B, T], state=None, recurrent=False) -> (logits [B, T, V] fp32, state)`.
    recurrent=False runs the WKV7 kernel over the whole sequence (training, prefill);
    recurrent=True steps token by token (generation, normally with T = 1). Both start from `state`
    (zeros when None) and return the state after the last token. `mask` [B, T] marks the real
    steps: a masked step (left padding, a finished row) leaves the state exactly as it was.

    Block 0 is its own module (`blocks_0`); blocks 1 ... L-1 run as one nn.scan over parameters
    stacked under `blocks` with a leading axis named 'layers' (`blocks/att/key/kernel` [L-1, C, C]), so
    compile time does not grow with depth. PEFT walks still address block i as `blocks_i/...`
    (peft/registry.py). With `cfg.scan_layers=False`, or when given unrolled parameters (`blocks_1` ...
    `blocks_{L-1}`, e.g. with an adapter whose targets differ by layer), the blocks run one by one: the
    model follows the layout of the parameters it is applied to.
    """

    config: RWKV7Config
    peft: PeftMethod | None = None

    def setup(self):
        cfg = self.config
        self.emb = Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         peft=self.peft, embedding_init=_sym_uniform(1e-4))
        block = nn.remat(Block, static_argnums=_REMAT_STATIC) if cfg.remat else Block
        self.blocks_0 = block(cfg, first=True, peft=self.peft)
        # Blocks 1 ... L-1: one module scanned over stacked params, or one module each (unrolled layout).
        self.blocks = (nn.remat(Block, static_argnums=_REMAT_STATIC, prevent_cse=False) if cfg.remat
                       else Block)(cfg, peft=self.peft)
        for i in range(1, cfg.n_layer):
            setattr(self, f"blocks_{i}", block(cfg, peft=self.peft))
        self.ln_out = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, peft=self.peft)
        self.head = Linear(cfg.vocab_size, axes=("embed", "vocab"), dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, peft=self.peft,
                           kernel_init=nn.initializers.orthogonal(
                               0.5 * math.sqrt(max(cfg.vocab_size / cfg.n_embd, 1.0))))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings [B, T, C] before ln0 (multimodal inputs are concatenated to these)."""
        return self.emb(tokens)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """The head alone: fp32 logits [..., V] from final hidden states [..., C] (after ln_out)."""
        return self.head(hidden).astype(jnp.float32)

    def __call__(self, tokens: jax.Array | None, state: RWKV7State | None = None, *,
                 embeddings: jax.Array | None = None, recurrent: bool = False,
                 mask: jax.Array | None = None,
                 return_hidden: bool = False) -> tuple[jax.Array, RWKV7State]:
        """tokens [B, T] int, or embeddings [B, T, C] in their place (they enter before ln0).

        return_hidden: the final hidden states [B, T, C] (after ln_out) instead of the logits.
        """
        cfg = self.config
        x = self.emb(tokens) if embeddings is None else embeddings.astype(cfg.dtype)
        if state is None:
            state = init_state(cfg, x.shape[0])
        x, ax, s, fx, v_first = self.blocks_0(x, state.att_x_prev[0], state.wkv[0], state.ffn_x_prev[0], None,
                                              0, recurrent, mask)
        first = RWKV7State(ax[None], s[None], fx[None])  # [1, ...] each
        if cfg.n_layer == 1:
            rest = None
        elif self.scanned():
            x, rest = self.scanned_blocks(x, v_first, state, recurrent, mask)
        else:
            per_layer = []
            for i in range(1, cfg.n_layer):
                x, ax, s, fx, v_first = getattr(self, f"blocks_{i}")(
                    x, state.att_x_prev[i], state.wkv[i], state.ffn_x_prev[i], v_first, i, recurrent, mask)
                per_layer.append((ax, s, fx))
            rest = RWKV7State(*(jnp.stack(t) for t in zip(*per_layer)))
        new_state = first if rest is None else RWKV7State(*(jnp.concatenate(t) for t in zip(first, rest)))
        hidden = self.ln_out(x)
        out = hidden if return_hidden else self.logits_from_hidden(hidden)
        return out, new_state

    def scanned(self) -> bool:
        """Whether blocks 1 ... L-1 run stacked under nn.scan: the config's choice at init, else the layout
        of the parameters being applied (a clear error when the adapter's layout does not match)."""
        if self.is_initializing():
            return self.config.scan_layers
        params, adapter = self.variables.get("params", {}), self.variables.get("adapter", {})
        scanned = STACK in params
        if scanned and any(registry.stack_of(k) == STACK for k in adapter):
            raise ValueError("the adapter holds per-layer entries (blocks_1, ...) but the model's blocks 1 ... L-1 "
                             "are stacked under 'blocks': convert the adapter with peft.registry.stack_layers (an "
                             "adapter or workdir written before the blocks were scanned), or unroll the params "
                             "with peft.registry.unstack_layers")
        if not scanned and STACK in adapter:
            raise ValueError("the adapter is stacked under 'blocks' but the model's parameters are unrolled "
                             "(blocks_1, ...): convert one with peft.registry.stack_layers / unstack_layers")
        return scanned

    def scanned_blocks(self, x: jax.Array, v_first: jax.Array, state: RWKV7State, recurrent: bool,
                       mask: jax.Array | None) -> tuple[jax.Array, RWKV7State]:
        """Blocks 1 ... L-1 as one nn.scan over stacked parameters, adapters and per-layer states (remat
        inside when cfg.remat); v_first is carried. Returns (x, their new states [L-1, ...])."""
        L = self.config.n_layer

        def body(block: Block, carry, xs):
            x, v_first = carry
            ax, s, fx, layer_id = xs
            x, ax, s, fx, v_first = block(x, ax, s, fx, v_first, layer_id, recurrent, mask)
            return (x, v_first), (ax, s, fx)

        scan = nn.scan(body, variable_axes={"params": 0, "adapter": 0}, split_rngs={"params": True, "dropout": True},
                       length=L - 1, metadata_params={nn.PARTITION_NAME: "layers"})
        xs = (state.att_x_prev[1:], state.wkv[1:], state.ffn_x_prev[1:], jnp.arange(1, L))
        (x, _), rest = scan(self.blocks, (x, v_first), xs)
        return x, RWKV7State(*rest)


# ------------------------------------------------------------------------------------------------
# Official checkpoints: .pth (torch, conversion time only) and safetensors + config.json.


def _read_pth(path: str) -> dict[str, np.ndarray]:
    """Tensors of an official .pth as numpy (bf16 kept as ml_dtypes.bfloat16)."""
    import ml_dtypes
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, t in sd.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = t.numpy()
    return out


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], str]:
    file = os.path.join(path, SAFETENSORS_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no {SAFETENSORS_FILE} found")
    return safetensors_io.SafetensorsFile(file).load_all(), file


def read_checkpoint(path: str) -> tuple[RWKV7Config, dict[str, np.ndarray]]:
    """Reads an official `.pth`, or a safetensors file/dir from `convert_pth_to_safetensors`.

    Returns the detected architecture and the tensors under their official names, validated.
    """
    path = os.fspath(path)
    if path.endswith(".pth"):
        source, tensors = path, _read_pth(path)
    else:
        tensors, source = _read_safetensors(path)
    config = detect_config(tensors, source)
    check_tensors(tensors, config, source)
    cfg_file = os.path.join(os.path.dirname(source), CONFIG_FILE)
    if not path.endswith(".pth") and os.path.exists(cfg_file):
        with open(cfg_file) as f:
            stored = json.load(f)
        differs = {k: (stored[k], v) for k, v in config.arch_dict().items()
                   if k in stored and stored[k] != v}
        if differs:
            raise ValueError(f"{cfg_file}: disagrees with the tensors of {source} "
                             f"(field: (config.json, tensors)): {differs}")
    return config, tensors


def _need(tensors: dict[str, np.ndarray], name: str, source: str, ndim: int) -> tuple[int, ...]:
    if name not in tensors:
        raise ValueError(f"{source}: missing tensor {name!r} (needed to detect the architecture)")
    shape = tuple(tensors[name].shape)
    if len(shape) != ndim:
        raise ValueError(f"{source}: tensor {name!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def detect_config(tensors: dict[str, np.ndarray], source: str = "<checkpoint>") -> RWKV7Config:
    """L, C, head size, FFN and LoRA widths from the tensor shapes; rejects DeepEmbed files."""
    deep = sorted(n for n in tensors if ".ffn.s_emb" in n or re.search(r"\.ffn\.s[012]$", n))
    if deep:
        raise ValueError(f"{source}: DeepEmbed RWKV-7 checkpoints are not supported "
                         f"(found {deep[0]!r}); use a plain x070 checkpoint")
    V, C = _need(tensors, "emb.weight", source, 2)
    H, N = _need(tensors, "blocks.0.att.r_k", source, 2)
    layers = {int(m.group(1)) for n in tensors if (m := re.match(r"blocks\.(\d+)\.", n))}
    L = max(layers) + 1
    v_name = "blocks.1.att.v1" if L > 1 else "blocks.0.att.v1"
    value_lora = (_need(tensors, v_name, source, 2)[1] if L > 1 or v_name in tensors else 0)
    return RWKV7Config(vocab_size=V, n_embd=C, n_layer=L, head_size=N,
                       dim_ffn=_need(tensors, "blocks.0.ffn.key.weight", source, 2)[0],
                       decay_lora=_need(tensors, "blocks.0.att.w1", source, 2)[1],
                       iclr_lora=_need(tensors, "blocks.0.att.a1", source, 2)[1],
                       value_lora=value_lora,
                       gate_lora=_need(tensors, "blocks.0.att.g1", source, 2)[1])


def official_shapes(config: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official x070 checkpoint with its shape (torch layout)."""
    V, C, F = config.vocab_size, config.n_embd, config.dim_ffn
    H, N = config.n_head, config.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,),
                                          "blocks.0.ln0.bias": (C,), "ln_out.weight": (C,),
                                          "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            shapes[p + n + ".weight"] = shapes[p + n + ".bias"] = (C,)
        for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            shapes[p + "att." + n] = (1, 1, C)
        shapes[p + "att.r_k"] = (H, N)
        loras = [("w", config.decay_lora), ("a", config.iclr_lora), ("g", config.gate_lora)]
        if i > 0:
            loras.append(("v", config.value_lora))
            shapes[p + "att.v0"] = (1, 1, C)
        for n, D in loras:
            shapes[f"{p}att.{n}1"], shapes[f"{p}att.{n}2"] = (C, D), (D, C)
        for n in ("receptance", "key", "value", "output"):
            shapes[f"{p}att.{n}.weight"] = (C, C)
        shapes[p + "att.ln_x.weight"] = shapes[p + "att.ln_x.bias"] = (C,)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"], shapes[p + "ffn.value.weight"] = (F, C), (C, F)
    return shapes


# Layer 0 of released files carries v0/v1/v2 that the model never uses (no value residual there).
_UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def check_tensors(tensors: dict[str, np.ndarray], config: RWKV7Config, source: str) -> None:
    """Raises a ValueError naming the file and tensor on missing, unexpected or misshaped tensors."""
    expected = official_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    unexpected = sorted(set(tensors) - set(expected) - set(_UNUSED))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) for an RWKV-7 x070 model: {unexpected[:8]}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape and not (len(shape) == 3 and got == shape[-1:]):
            raise ValueError(f"{source}: tensor {name!r} has shape {got}, expected {shape} "
                             f"(architecture detected from emb.weight, blocks.0.att.r_k and the "
                             f"LoRA/FFN widths of layers 0-1: {config.arch_dict()})")


def params_from_official(tensors: dict[str, np.ndarray], config: RWKV7Config,
                         dtype: Dtype = jnp.float32) -> Params:
    """Official tensors (torch layout) -> the `params` tree of `RWKV7` (Linear kernels [in, out]), blocks
    1 ... L-1 stacked under `blocks` when `config.scan_layers` (stacked on the host, copied once)."""
    def arr(name, transpose=False, flat=False):
        x = np.asarray(tensors[name])
        x = x.T if transpose else x
        x = x.reshape(-1) if flat else x
        return x.astype(dtype)

    def norm(name):
        return {"scale": arr(name + ".weight"), "bias": arr(name + ".bias")}

    params: Params = {"emb": {"embedding": arr("emb.weight")}, "ln_out": norm("ln_out"),
                      "head": {"kernel": arr("head.weight", transpose=True)}}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        att: Params = {n: arr(p + "att." + n, flat=True)
                       for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a")}
        att["r_k"] = arr(p + "att.r_k")
        loras = "wag" if i == 0 else "wagv"
        if i > 0:
            att["v0"] = arr(p + "att.v0", flat=True)
        for n in loras:
            att[n + "1"] = {"kernel": arr(f"{p}att.{n}1")}
            att[n + "2"] = {"kernel": arr(f"{p}att.{n}2")}
        for n in ("receptance", "key", "value", "output"):
            att[n] = {"kernel": arr(f"{p}att.{n}.weight", transpose=True)}
        att["ln_x"] = norm(p + "att.ln_x")
        ffn = {"x_k": arr(p + "ffn.x_k", flat=True),
               "key": {"kernel": arr(p + "ffn.key.weight", transpose=True)},
               "value": {"kernel": arr(p + "ffn.value.weight", transpose=True)}}
        block = {"ln1": norm(p + "ln1"), "ln2": norm(p + "ln2"), "att": att, "ffn": ffn}
        if i == 0:
            block["ln0"] = norm("blocks.0.ln0")
        params[f"blocks_{i}"] = block
    if config.scan_layers:
        params = registry.stack_layers(params)
    return jax.tree.map(jnp.asarray, params)


def params_to_official(params: Params, config: RWKV7Config) -> dict[str, np.ndarray]:
    """Inverse of `params_from_official` (either layout): the official tensors (torch layout, (1, 1, C)
    vectors), one per block."""
    shapes = official_shapes(config)
    out = {}
    params = registry.unstack_layers(jax.device_get(params))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        block = re.fullmatch(r"blocks_(\d+)", keys[0])
        mods = ([f"blocks.{block.group(1)}"] if block else [keys[0]]) + keys[1:-1]
        leaf_name = keys[-1]
        x = np.asarray(leaf)
        if leaf_name == "kernel":
            name = ".".join(mods)
            if name + ".weight" in shapes:  # a torch Linear: [out, in]
                name, x = name + ".weight", x.T
        elif leaf_name in ("scale", "bias", "embedding"):
            name = ".".join(mods) + (".bias" if leaf_name == "bias" else ".weight")
        else:
            name = ".".join(mods + [leaf_name])
        if name not in shapes:
            raise ValueError(f"params_to_official: no official tensor for parameter {'/'.join(keys)} ({name})")
        out[name] = np.ascontiguousarray(x.reshape(shapes[name]))
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise ValueError(f"params_to_official: the params lack {missing[:8]}")
    return out


def save(path: str, config: RWKV7Config, params: Params) -> None:
    """Writes `path/model.safetensors` (official names and layout) and `path/config.json`, which
    `load` and the family registry read back."""
    os.makedirs(path, exist_ok=True)
    safetensors_io.save_safetensors(os.path.join(path, SAFETENSORS_FILE), params_to_official(params, config),
                                    metadata={"format": "rwkv7-x070"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"architecture": "rwkv7-x070", **config.arch_dict()}, f, indent=2)


def load(path: str, dtype: Dtype = jnp.float32, compute_dtype: Dtype | None = None,
         peft: PeftMethod | None = None, remat: bool = False,
         mesh: Mesh | None = None) -> tuple[RWKV7, Params]:
    """Loads an official `.pth`, or a safetensors dir/file; returns (model, params).

    `dtype` is the parameter dtype (as for `hf.load`); the model computes in `compute_dtype`
    (default: `dtype`). With a `mesh`, the parameters are placed by their logical axes.
    """
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    config, tensors = read_checkpoint(path)
    config = dataclasses.replace(config, dtype=compute_dtype, param_dtype=dtype, remat=remat)
    params = params_from_official(tensors, config, dtype)
    if mesh is not None:
        params = jax.tree.map(jax.device_put, params,
                              mesh_lib.param_shardings(abstract_params(config), mesh))
    return RWKV7(config, peft=peft), params


def abstract_params(config: RWKV7Config) -> Any:
    """The boxed (logically partitioned) parameter shapes, without allocating anything."""
    return jax.eval_shape(lambda key: RWKV7(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"],
                          jax.random.key(0))


def init_params(config: RWKV7Config, key: jax.Array) -> Params:
    """Random parameters (the official train_temp init), unboxed, in the layout `config.scan_layers` says.

    The same numbers in both layouts (drawn per named block, then stacked), so a seed gives the same
    model whichever way its blocks run.
    """
    unrolled = dataclasses.replace(config, scan_layers=False)
    params = nn.unbox(RWKV7(unrolled).init(key, jnp.zeros((1, 1), jnp.int32))["params"])
    return registry.stack_layers(params) if config.scan_layers else params


def param_axes(config: RWKV7Config) -> Any:
    """The logical axis names of every weight (a tuple per leaf, nested like the params)."""
    specs = nn.get_partition_spec(abstract_params(config))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def convert_pth_to_safetensors(src: str, dst: str) -> RWKV7Config:
    """Writes `dst/model.safetensors` (official names, original dtypes) and `dst/config.json`."""
    config, tensors = read_checkpoint(src)
    os.makedirs(dst, exist_ok=True)
    safetensors_io.save_safetensors(os.path.join(dst, SAFETENSORS_FILE), tensors,
                                    metadata={"format": "rwkv7-x070"})
    with open(os.path.join(dst, CONFIG_FILE), "w") as f:
        json.dump({"architecture": "rwkv7-x070", **config.arch_dict()}, f, indent=2)
    return config


# ------------------------------------------------------------------------------------------------
# The family interface (jaxrl_peft.models.family): what the shared sampler and the tasks use.

STATE_AXES = RWKV7State(att_x_prev=("layers", "batch", None), wkv=("layers", "batch", None, None, None),
                        ffn_x_prev=("layers", "batch", None))


@dataclasses.dataclass(frozen=True)
class RWKV7Family:
    """RWKV-7 behind `jaxrl_peft.models.family.Family`: parallel prefill, then the O(1) recurrent state.

    Left padding and finished rows are masked steps, which leave the state exactly as it was, so a
    padded prompt ends in the state of the same prompt alone. Rows cannot be packed: the state does not
    reset at a segment boundary.
    """

    module: RWKV7
    path: str | None = None

    name: ClassVar[str] = "rwkv7"
    packs_segments: ClassVar[bool] = False
    continues_state: ClassVar[bool] = True  # the O(1) state: a chat's next turn feeds only its new tokens

    @property
    def config(self) -> RWKV7Config:
        return self.module.config

    def with_peft(self, method: PeftMethod | None, remat: bool | None = None) -> "RWKV7Family":
        cfg = self.config if remat is None else dataclasses.replace(self.config, remat=remat)
        return dataclasses.replace(self, module=RWKV7(cfg, peft=method))

    def param_axes(self) -> Any:
        return param_axes(self.config)

    def tokenizer(self) -> hf.Tokenizer:
        return family_lib.tokenizer_at(self.path)

    def stop_ids(self, tokenizer: hf.Tokenizer) -> list[int]:
        return [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    def logits(self, variables: dict, tokens: jax.Array) -> jax.Array:
        return self.module.apply(variables, tokens)[0]

    def token_logprobs(self, variables: dict, tokens: jax.Array, positions: jax.Array | None = None,
                       segment_ids: jax.Array | None = None, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """Right-padded rows, one example each (positions and segment ids carry nothing more then)."""
        del positions, segment_ids
        hidden = self.module.apply(variables, tokens, return_hidden=True)[0][:, :-1]  # [B, T-1, C]
        head = lambda h: self.module.apply(variables, h, method=RWKV7.logits_from_hidden)  # noqa: E731
        return chunked_token_logprobs(hidden, tokens[:, 1:], head, temperature=temperature,
                                                 with_entropy=with_entropy)

    def init_state(self, batch: int, max_len: int) -> RWKV7State:
        del max_len  # the state does not grow with the sequence
        return init_state(self.config, batch)

    def state_axes(self, state: Any) -> Any:
        del state
        return STATE_AXES

    def prefill(self, variables: dict, state: RWKV7State, tokens: jax.Array | None, mask: jax.Array,
                embeddings: jax.Array | None = None) -> tuple[jax.Array, RWKV7State]:
        logits, state = self.module.apply(variables, None if embeddings is not None else tokens, state,
                                          embeddings=embeddings, mask=mask.astype(jnp.bool_))
        return logits[:, -1], state

    def decode_step(self, variables: dict, state: RWKV7State, tokens: jax.Array,
                    active: jax.Array) -> tuple[jax.Array, RWKV7State]:
        logits, state = self.module.apply(variables, tokens[:, None], state, recurrent=True,
                                          mask=active[:, None])
        return logits[:, 0], state


def preset_family(name: str, layers: int | None = None, dtype: str = "bfloat16", remat: bool = False,
                  scan_layers: bool = True) -> tuple[RWKV7Family, Any]:
    """A released shape with random weights as (RWKV7Family, init): init() draws the parameters (the
    train benchmarks' model; `layers` overrides the depth)."""
    config = preset(name, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), remat=remat,
                    scan_layers=scan_layers)
    config = dataclasses.replace(config, n_layer=layers or config.n_layer)
    return RWKV7Family(RWKV7(config)), lambda: init_params(config, jax.random.key(0))


def load_family(path: str, dtype: Dtype = jnp.float32, compute_dtype: Dtype | None = None,
                mesh: Mesh | None = None) -> tuple[RWKV7Family, Params]:
    """An RWKV-7 checkpoint as (RWKV7Family, params): the family registry's loader."""
    model, params = load(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
    return RWKV7Family(model, str(path)), params
