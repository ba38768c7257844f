"""The DeepSeek-R1-Distill decoder: Qwen2 (q/k/v bias, GQA) and Llama (Llama-3 RoPE scaling) variants.

Flax linen; parameters are plain nested dicts named like the Hugging Face modules, so PEFT target
patterns read the same as in HF PEFT. Every projection goes through the shared `Linear`; parameters
carry logical axis names.

The decoder layers run under `nn.scan` (`cfg.scan_layers`, the default), so compile time does not
grow with depth: their parameters are stacked under one `layers` module with a leading axis named
'layers' (`layers/self_attn/q_proj/kernel` [L, in, out]). PEFT walks still address layer i as
`layers_i/...` (peft/registry.py). With `scan_layers=False`, or when given unrolled parameters
(`layers_0` ... `layers_{L-1}`, e.g. an adapter whose targets differ by layer), the model unrolls its
layers; it always follows the layout of the parameters it is applied to.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models.layers import Embed, Linear, RMSNorm, chunked_token_logprobs
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod

Array = jax.Array
# One layer's KV cache: {'k': [B, S, K, Dh], 'v': [B, S, K, Dh]}.
LayerCache = dict[str, Array]
# The whole KV cache, every layer stacked: {'k': [L, B, S, K, Dh], 'v': [L, B, S, K, Dh]}.
Cache = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shapes and numerics of a decoder; field names follow HF config.json where they exist."""

    arch: str  # 'qwen2' | 'llama'
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    # Llama-3 scaling as (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    rope_scaling: tuple[float, float, float, int] | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 131_072
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # recompute each block in the backward pass (training memory)
    # Attention kernel for plain causal attention (no explicit mask): 'xla', 'cudnn' (flash attention
    # on NVIDIA GPUs, bf16/fp16), or None to pick cudnn on GPU with a 16-bit dtype and xla otherwise.
    attention_impl: str | None = None
    # Run the layers under nn.scan with stacked parameters (compile time independent of depth);
    # False unrolls them into layers_0 ... layers_{L-1} (per-layer PEFT targets need that layout).
    scan_layers: bool = True

    def replace(self, **kw: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        block = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * block + d


def _qwen2(**kw: Any) -> TransformerConfig:
    return TransformerConfig(arch="qwen2", qkv_bias=True, bos_token_id=151643, eos_token_id=151643,
                             head_dim=128, **kw)


def _llama(**kw: Any) -> TransformerConfig:
    return TransformerConfig(arch="llama", rope_theta=500_000.0, rope_scaling=(8.0, 1.0, 4.0, 8192),
                             rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                             head_dim=128, vocab_size=128256, **kw)


# The public shapes of every DeepSeek-R1-Distill checkpoint, plus a tiny one for tests and CPU runs.
PRESETS: dict[str, TransformerConfig] = {
    "r1-distill-qwen-1.5b": _qwen2(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_layers=28, num_heads=12, num_kv_heads=2),
    "r1-distill-qwen-7b": _qwen2(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_layers=28, num_heads=28, num_kv_heads=4),
    "r1-distill-qwen-14b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                                  num_layers=48, num_heads=40, num_kv_heads=8, rope_theta=1e6,
                                  rms_norm_eps=1e-5),
    "r1-distill-qwen-32b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                  num_layers=64, num_heads=40, num_kv_heads=8, rope_theta=1e6,
                                  rms_norm_eps=1e-5),
    "r1-distill-llama-8b": _llama(hidden_size=4096, intermediate_size=14336, num_layers=32,
                                  num_heads=32, num_kv_heads=8),
    "r1-distill-llama-70b": _llama(hidden_size=8192, intermediate_size=28672, num_layers=80,
                                   num_heads=64, num_kv_heads=8),
    "tiny": TransformerConfig(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                              max_position_embeddings=4096),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def rope_inv_freq(cfg: TransformerConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] as HF computes them (fp32), with Llama-3 scaling if set."""
    dim = cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if cfg.rope_scaling is None:
        return inv.astype(np.float32)
    factor, low, high, old_ctx = cfg.rope_scaling
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotary embedding, HF 'rotate_half' layout. x: [B, T, N, Dh], positions: [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    cfg: TransformerConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array,
                 cache: LayerCache | None, cache_index: Array | None) -> tuple[Array, LayerCache | None]:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        lin = dict(dtype=dt, param_dtype=pdt, peft=self.peft)
        b, t, _ = x.shape
        q = Linear(cfg.num_heads * cfg.head_dim, ("embed", "heads"), cfg.qkv_bias, name="q_proj", **lin)(x)
        k = Linear(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, name="k_proj", **lin)(x)
        v = Linear(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, name="v_proj", **lin)(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, N, Dh]
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, Dh]
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        inv_freq = rope_inv_freq(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)}
            k, v = cache["k"].astype(dt), cache["v"].astype(dt)
        # mask None: plain causal attention, which can run as cuDNN flash attention on GPU.
        impl = "xla" if mask is not None else cfg.attention_impl
        if impl is None:
            fused = jax.default_backend() == "gpu" and dt in (jnp.bfloat16, jnp.float16)
            impl = "cudnn" if fused else "xla"
        y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, implementation=impl,
                                         scale=1.0 / math.sqrt(cfg.head_dim))
        y = y.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return Linear(cfg.hidden_size, ("heads", "embed"), name="o_proj", **lin)(y), cache


class MLP(nn.Module):
    cfg: TransformerConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        lin = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        gate = Linear(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **lin)(x)
        up = Linear(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **lin)(x)
        return Linear(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **lin)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm block. Carry in and out: (x [B, T, D], the whole stacked Cache or None); it reads and
    writes its own slice `layer` of the cache, in place, so scanning over layers copies no cache."""

    cfg: TransformerConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, carry: tuple[Array, Cache | None], positions: Array, mask: Array | None,
                 cache_index: Array | None, layer: Array | int) -> tuple[tuple[Array, Cache | None], None]:
        cfg = self.cfg
        x, cache = carry
        norm = dict(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                    peft=self.peft)
        layer_cache = None if cache is None else {k: c[layer] for k, c in cache.items()}
        h, layer_cache = Attention(cfg, self.peft, name="self_attn")(
            RMSNorm(name="input_layernorm", **norm)(x), positions, mask, layer_cache, cache_index)
        x = x + h
        x = x + MLP(cfg, self.peft, name="mlp")(RMSNorm(name="post_attention_layernorm", **norm)(x))
        if cache is not None:
            cache = {k: jax.lax.dynamic_update_index_in_dim(c, layer_cache[k], layer, 0) for k, c in cache.items()}
        return (x, cache), None


def make_mask(q_positions: Array, kv_positions: Array, kv_valid: Array,
                   q_segments: Array | None = None, kv_segments: Array | None = None) -> Array:
    """Boolean mask [B, 1, T, S]: causal by slot index, valid keys only, same segment only.

    q_positions: [T] slot of each query in the key sequence; kv_positions: [S]; kv_valid: [B, S].
    """
    mask = (kv_positions[None, :] <= q_positions[:, None])[None, None]  # [1, 1, T, S]
    mask = mask & kv_valid[:, None, None, :]
    if q_segments is not None:
        mask = mask & (q_segments[:, None, :, None] == kv_segments[:, None, None, :])
    return mask


class Transformer(nn.Module):
    """Decoder-only LM. `apply({'params': p[, 'adapter': a]}, tokens, ...) -> logits [B, T, V]`.

    `embeddings` [B, T, D] may stand in for `tokens` (HF's `inputs_embeds`): they replace the token
    embedding lookup (`embed`), so encoder outputs can be spliced in; everything after is unchanged.
    Without a cache: full causal forward over `tokens` [B, T] (left padding via `attention_mask`
    [B, T], packed sequences via `segment_ids` [B, T]); returns logits. With neither, attention is plain
    causal (right padding needs no mask: no real token attends to a later pad).
    With `cache` (the stacked Cache from `init_cache`): writes this call's keys and
    values at slot `cache_index` and attends over the whole cache, masked by `kv_mask` [B, S];
    returns (logits, new_cache). Used for prefill and for decoding one token at a time.
    """

    cfg: TransformerConfig
    peft: PeftMethod | None = None

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                                  param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)

    def embed(self, tokens: Array) -> Array:
        """Token embeddings [B, T, D] (the first layer's input), for splicing other inputs into them."""
        return self.embed_tokens(tokens)

    @nn.compact
    def __call__(self, tokens: Array | None, positions: Array | None = None,
                 attention_mask: Array | None = None, segment_ids: Array | None = None,
                 cache: Cache | None = None, cache_index: Array | int | None = None,
                 kv_mask: Array | None = None, return_hidden: bool = False, *,
                 embeddings: Array | None = None):
        cfg = self.cfg
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens [batch, time] and embeddings [batch, time, hidden]")
        if embeddings is not None:
            if embeddings.ndim != 3 or embeddings.shape[-1] != cfg.hidden_size:
                raise ValueError(f"embeddings must be [batch, time, {cfg.hidden_size}], got {embeddings.shape}")
            b, t = embeddings.shape[:2]
        else:
            b, t = tokens.shape
        plain_causal = cache is None and attention_mask is None and segment_ids is None
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        if plain_causal:
            mask = None
        elif cache is None:
            slots = jnp.arange(t)
            mask = make_mask(slots, slots, attention_mask, segment_ids, segment_ids)
        else:
            if kv_mask is None or cache_index is None:
                raise ValueError("decoding with a cache needs cache_index and kv_mask [batch, cache_size]")
            s = cache["k"].shape[2]
            mask = make_mask(cache_index + jnp.arange(t), jnp.arange(s), kv_mask.astype(jnp.bool_))
        x = self.embed(tokens) if embeddings is None else embeddings.astype(jnp.dtype(cfg.dtype))
        if self.scanned():
            x, cache = self.scanned_layers(x, positions, mask, cache, cache_index)
        else:
            layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
            for i in range(cfg.num_layers):
                (x, cache), _ = layer_cls(cfg, self.peft, name=f"layers_{i}")((x, cache), positions, mask,
                                                                                cache_index, i)
        x = RMSNorm(eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                    peft=self.peft, name="norm")(x)
        if return_hidden:
            out = x
        elif cfg.tie_embeddings:
            out = self.embed_tokens.attend(x)
        else:
            out = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft, name="lm_head")(x)
        return out if cache is None else (out, cache)

    def scanned(self) -> bool:
        """Whether the layers run stacked under nn.scan: the config's choice at init, else the layout of
        the parameters being applied (a clear error when the adapter's layout does not match)."""
        if self.is_initializing():
            return self.cfg.scan_layers
        params, adapter = self.variables.get("params", {}), self.variables.get("adapter", {})
        scanned = registry.LAYERS in params
        unrolled_adapter = any(registry.layer_index(k) is not None for k in adapter)
        if scanned and unrolled_adapter:
            raise ValueError("the adapter holds per-layer entries (layers_0, ...) but the model's layers are "
                             "stacked under 'layers': convert the adapter with peft.registry.stack_layers "
                             "(an adapter or workdir written before layers were scanned), or unroll the "
                             "params with peft.registry.unstack_layers")
        if not scanned and registry.LAYERS in adapter:
            raise ValueError("the adapter is stacked under 'layers' but the model's parameters are unrolled "
                             "(layers_0, ...): convert one with peft.registry.stack_layers / unstack_layers")
        return scanned

    def scanned_layers(self, x: Array, positions: Array, mask: Array | None, cache: Cache | None,
                       cache_index: Array | None) -> tuple[Array, Cache | None]:
        """Every decoder layer as one nn.scan over stacked parameters and adapters (remat inside)."""
        cfg = self.cfg
        block = nn.remat(DecoderLayer, prevent_cse=False) if cfg.remat else DecoderLayer
        stack = nn.scan(block, variable_axes={"params": 0, "adapter": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        (x, cache), _ = stack(cfg, self.peft, name=registry.LAYERS)(
            (x, cache), positions, mask, cache_index, jnp.arange(cfg.num_layers))
        return x, cache


def init_cache(cfg: TransformerConfig, batch: int, size: int, dtype: Any = None) -> Cache:
    """Zeroed KV cache with `size` slots per row, every layer stacked: {'k', 'v'}: [L, B, S, K, Dh]."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def abstract_params(cfg: TransformerConfig) -> Any:
    """The boxed (logically partitioned) parameter shapes, without allocating anything."""
    model = Transformer(cfg)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def param_axes(cfg: TransformerConfig) -> Any:
    """The logical axis names of every weight (a tuple per leaf, nested like the params)."""
    specs = nn.get_partition_spec(abstract_params(cfg))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_params(cfg: TransformerConfig, key: Array) -> Any:
    """Random parameters (HF init: normal(0.02) weights, zero biases, unit norms), unboxed.

    The same numbers in both layouts (drawn per named layer, then stacked when `cfg.scan_layers`), so a
    seed gives the same model whichever way its layers run.
    """
    model = Transformer(cfg.replace(scan_layers=False))
    params = nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
    return registry.stack_layers(params) if cfg.scan_layers else params


def shard_params(params: Any, cfg: TransformerConfig, mesh: jax.sharding.Mesh, rules: Any = None) -> Any:
    """Places an (unboxed) parameter tree, in either layout, on `mesh` following the model's logical axes."""
    layout = cfg.replace(scan_layers=registry.is_stacked(params))
    shardings = mesh_lib.param_shardings(abstract_params(layout), mesh, rules or mesh_lib.LOGICAL_RULES)
    return jax.tree.map(jax.device_put, params, shardings)


def head_logits(cfg: TransformerConfig, peft: PeftMethod | None, variables: dict, hidden: Array) -> Array:
    """The output projection alone: logits [..., V] from final hidden states [..., D]."""
    params = variables["params"]
    if cfg.tie_embeddings:
        embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), peft=peft)
        sub = {"params": params["embed_tokens"]}
        if "embed_tokens" in variables.get("adapter", {}):
            sub["adapter"] = variables["adapter"]["embed_tokens"]
        return embed.apply(sub, hidden, method=Embed.attend)
    head = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype), peft=peft)
    sub = {"params": params["lm_head"]}
    if "lm_head" in variables.get("adapter", {}):
        sub["adapter"] = variables["adapter"]["lm_head"]
    return head.apply(sub, hidden)


def token_logprobs(model: Transformer, variables: dict, tokens: Array, chunk: int = 512,
                   with_entropy: bool = False, temperature: float = 1.0,
                   **kwargs: Any) -> tuple[Array, Array | None]:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every position: [B, T-1] (and the entropy), under
    softmax(logits / temperature), the distribution the sampler draws from.

    The vocabulary projection runs `chunk` positions at a time under remat, so [B, T, V] logits are
    never held in memory (forward or backward). kwargs go to the model (attention_mask, positions, ...).
    """
    hidden = model.apply(variables, tokens, return_hidden=True, **kwargs)[:, :-1]  # [B, T-1, D]
    return chunked_token_logprobs(hidden, tokens[:, 1:], lambda h: head_logits(model.cfg, model.peft, variables, h),
                                  chunk=chunk, temperature=temperature, with_entropy=with_entropy)
