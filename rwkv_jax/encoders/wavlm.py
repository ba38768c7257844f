"""The WavLM speech encoder (ModRWKV's WavLM base+ / large front end) in Flax linen.

Raw 16 kHz samples -> convolutional feature extractor (50 Hz) -> feature projection -> weight-normed
grouped positional convolution -> transformer blocks with a gated relative position bias. Both variants:
base/base+ (group-norm extractor, post-LN blocks) and large (layer-norm extractor, pre-LN blocks), and
both weight-norm key layouts (`weight_g`/`weight_v` and `parametrizations.weight.original0/1`).
Outputs equal transformers' `WavLMModel` `last_hidden_state`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.models.layers import Conv1D, LayerNorm, Linear, adapted_gain, conv_kernel
from jaxrl_peft.models.safetensors_io import CheckpointError, TensorIndex
from jaxrl_peft.peft.base import PeftMethod
from rwkv_jax.encoders.whisper import (ACTIVATIONS, attention, check_unexpected, linear_kernel, read_config,
                                       read_params, split_heads, tensor_prefix)

MODEL_TYPES = ("wavlm",)

# Training-only tensors a WavLMModel checkpoint may hold (SpecAugment's mask embedding).
_IGNORED = ("masked_spec_embed",)
# The two names torch has used for a weight-normed conv's magnitude and direction.
_WEIGHT_NORM_KEYS = {"weight_g": ("weight_g", "parametrizations.weight.original0"),
                     "weight_v": ("weight_v", "parametrizations.weight.original1")}


@dataclasses.dataclass(frozen=True)
class WavLMEncoderConfig:
    """The fields of a WavLM config.json the encoder needs, plus the preprocessor's mask setting."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    num_buckets: int = 320
    max_bucket_distance: int = 800
    do_stable_layer_norm: bool = False
    # preprocessor_config.json: whether the processor hands the model an attention mask (ModRWKV passes
    # whatever the processor returns), and whether it normalises each clip (see audio.wavlm_inputs).
    use_attention_mask: bool = True
    do_normalize: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"


def config_from_hf(hf: dict[str, Any], source: str = "config.json",
                   preprocessor: dict[str, Any] | None = None) -> WavLMEncoderConfig:
    """Reads an HF WavLM config dict (and, when given, its preprocessor_config.json dict)."""
    defaults = WavLMEncoderConfig()
    fields = {f.name for f in dataclasses.fields(WavLMEncoderConfig)} - {
        "use_attention_mask", "do_normalize", "dtype", "param_dtype"}
    values = {k: (tuple(hf[k]) if isinstance(hf[k], list) else hf[k]) for k in fields if k in hf}
    preprocessor = preprocessor or {}
    cfg = dataclasses.replace(
        defaults, **values,
        use_attention_mask=bool(preprocessor.get("return_attention_mask", defaults.use_attention_mask)),
        do_normalize=bool(preprocessor.get("do_normalize", defaults.do_normalize)))
    if hf.get("add_adapter"):
        raise CheckpointError(f"{source}: add_adapter=true (a convolutional adapter after the encoder) "
                              "is not supported")
    if cfg.feat_extract_norm not in ("group", "layer"):
        raise CheckpointError(f"{source}: feat_extract_norm {cfg.feat_extract_norm!r}, expected 'group' or 'layer'")
    if not len(cfg.conv_dim) == len(cfg.conv_stride) == len(cfg.conv_kernel):
        raise CheckpointError(f"{source}: conv_dim, conv_stride and conv_kernel must have the same length")
    for name in ("hidden_act", "feat_extract_activation"):
        if getattr(cfg, name) not in ACTIVATIONS:
            raise CheckpointError(f"{source}: {name} {getattr(cfg, name)!r} is not supported; "
                                  f"known: {sorted(ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads or cfg.hidden_size % cfg.num_conv_pos_embedding_groups:
        raise CheckpointError(f"{source}: hidden_size {cfg.hidden_size} must be divisible by "
                              "num_attention_heads and num_conv_pos_embedding_groups")
    return cfg


def output_lengths(config: WavLMEncoderConfig, sample_counts: jax.Array) -> jax.Array:
    """Frames the feature extractor makes from each row's sample count (floor((L - k) / s) + 1 per conv)."""
    lengths = sample_counts
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        lengths = (lengths - kernel) // stride + 1
    return lengths


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each (query, key) offset [length, length], in fp32 like transformers (T5-style buckets)."""
    half = num_buckets // 2
    max_exact = half // 2
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
    buckets = (offsets > 0).astype(np.int64) * half
    distance = np.abs(offsets)
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum((np.float32(max_exact) + scaled).astype(np.int64), half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class ChannelNorm(nn.Module):
    """GroupNorm with one group per channel: each channel of [B, T, C] normalised over time (fp32)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (channels,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (channels,), self.param_dtype)
        scale = adapted_gain(self, scale)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ConvLayer(nn.Module):
    """One extractor convolution (a Linear over its windows), its optional norm and the activation."""

    config: WavLMEncoderConfig
    index: int
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, i = self.config, self.index
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        x = Conv1D(cfg.conv_dim[i], (None, "embed"), cfg.conv_bias, kernel_size=cfg.conv_kernel[i],
                   stride=cfg.conv_stride[i], name="conv", **kw)(x)  # [B, frames_i, conv_dim[i]]
        if cfg.feat_extract_norm == "layer":
            x = LayerNorm(1e-5, name="layer_norm", **kw)(x)
        elif i == 0:
            x = ChannelNorm(1e-5, name="layer_norm", **kw)(x)
        return ACTIVATIONS[cfg.feat_extract_activation](x)


class FeatureExtractor(nn.Module):
    """Strided convolutions over raw samples [B, T] -> [B, frames, conv_dim[-1]] (one frame per 20 ms)."""

    config: WavLMEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, samples: jax.Array) -> jax.Array:
        x = samples[:, :, None].astype(jnp.dtype(self.config.dtype))  # [B, T, 1]
        for i in range(len(self.config.conv_dim)):
            x = ConvLayer(self.config, i, peft=self.peft, name=f"conv_layers_{i}")(x)
        return x


class FeatureProjection(nn.Module):
    """LayerNorm then Linear from the extractor's channels to the transformer width."""

    config: WavLMEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        x = LayerNorm(cfg.layer_norm_eps, name="layer_norm", **kw)(x)
        return Linear(cfg.hidden_size, (None, "embed"), True, name="projection", **kw)(x)


class PositionalConv(nn.Module):
    """Weight-normed grouped Conv1d over frames (kernel K, 'same' length) followed by the activation.

    The weights stay as stored (magnitude `weight_g` [1, 1, K], direction `weight_v` [D, D/G, K]) so
    the checkpoint maps one to one onto the parameter tree.
    """

    config: WavLMEncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width, groups, dim = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, cfg.hidden_size
        pdtype = jnp.dtype(cfg.param_dtype)
        magnitude = self.param("weight_g", nn.with_logical_partitioning(nn.initializers.ones, (None, None, None)),
                               (1, 1, width), pdtype)
        direction = self.param("weight_v", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", None, None)), (dim, dim // groups, width), pdtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (dim,), pdtype)
        direction32 = direction.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(direction32), axis=(0, 1), keepdims=True))  # [1, 1, K]
        weight = magnitude.astype(jnp.float32) * direction32 / norm  # [D_out, D/G, K]
        dtype = jnp.dtype(cfg.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), jnp.transpose(weight, (2, 1, 0)).astype(dtype), window_strides=(1,),
            padding=[(width // 2, width // 2)], dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=groups, preferred_element_type=jnp.float32)  # [B, T (+1 if K even), D]
        y = y[:, :x.shape[1]] + bias.astype(jnp.float32)
        return ACTIVATIONS[cfg.feat_extract_activation](y).astype(dtype)


class WavLMAttention(nn.Module):
    """Self-attention with WavLM's gated relative position bias; returns (output, ungated bias)."""

    config: WavLMEncoderConfig
    has_relative_position_bias: bool = False
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None,
                 key_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        heads = cfg.num_attention_heads
        batch, length, dim = x.shape
        if position_bias is None:
            if not self.has_relative_position_bias:
                raise ValueError("WavLMAttention: the first layer must own the relative position embedding")
            table = self.param("rel_attn_embed", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, "heads")), (cfg.num_buckets, heads),
                jnp.dtype(cfg.param_dtype))
            buckets = relative_position_buckets(length, cfg.num_buckets, cfg.max_bucket_distance)
            position_bias = jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))  # [H, T, T]
        per_head = x.reshape(batch, length, heads, dim // heads).transpose(0, 2, 1, 3)  # [B, H, T, Dh]
        gate_logits = Linear(8, (None, None), True, name="gru_rel_pos_linear", **kw)(per_head)
        gate_logits = gate_logits.astype(jnp.float32).reshape(batch, heads, length, 2, 4).sum(-1)
        gate_a, gate_b = jnp.split(jax.nn.sigmoid(gate_logits), 2, axis=-1)  # [B, H, T, 1] each
        const = self.param("gru_rel_pos_const", nn.with_logical_partitioning(
            nn.initializers.ones, (None, "heads", None, None)), (1, heads, 1, 1), jnp.dtype(cfg.param_dtype))
        gate = gate_a * (gate_b * const.astype(jnp.float32) - 1.0) + 2.0
        bias = gate * position_bias[None]  # [B, H, T, T]
        if key_mask is not None:
            bias = jnp.where(key_mask[:, None, None, :], bias, -jnp.inf)
        q = split_heads(Linear(dim, ("embed", "heads"), True, name="q_proj", **kw)(x), heads)
        k = split_heads(Linear(dim, ("embed", "heads"), True, name="k_proj", **kw)(x), heads)
        v = split_heads(Linear(dim, ("embed", "heads"), True, name="v_proj", **kw)(x), heads)
        out = Linear(dim, ("heads", "embed"), True, name="out_proj", **kw)(attention(q, k, v, bias))
        return out, position_bias


class FeedForward(nn.Module):
    """intermediate_dense -> activation -> output_dense."""

    config: WavLMEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        x = ACTIVATIONS[cfg.hidden_act](
            Linear(cfg.intermediate_size, ("embed", "mlp"), True, name="intermediate_dense", **kw)(x))
        return Linear(cfg.hidden_size, ("mlp", "embed"), True, name="output_dense", **kw)(x)


class WavLMEncoderLayer(nn.Module):
    """One block: post-LN (base, base+) or pre-LN (large, do_stable_layer_norm)."""

    config: WavLMEncoderConfig
    has_relative_position_bias: bool = False
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array | None,
                 key_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        attn = WavLMAttention(cfg, self.has_relative_position_bias, peft=self.peft, name="attention")
        norm = LayerNorm(cfg.layer_norm_eps, name="layer_norm", **kw)
        final_norm = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)
        feed_forward = FeedForward(cfg, peft=self.peft, name="feed_forward")
        if cfg.do_stable_layer_norm:
            out, position_bias = attn(norm(x), position_bias, key_mask)
            x = x + out
            return x + feed_forward(final_norm(x)), position_bias
        out, position_bias = attn(x, position_bias, key_mask)
        x = norm(x + out)
        return final_norm(x + feed_forward(x)), position_bias


class TransformerEncoder(nn.Module):
    """Positional convolution, then the blocks; the final LayerNorm before (base) or after (large) them."""

    config: WavLMEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        norm = LayerNorm(cfg.layer_norm_eps, name="layer_norm", **kw)
        if key_mask is not None:
            x = jnp.where(key_mask[:, :, None], x, 0)
        x = x + PositionalConv(cfg, name="pos_conv_embed")(x)
        if not cfg.do_stable_layer_norm:
            x = norm(x)
        position_bias = None
        for i in range(cfg.num_hidden_layers):
            x, position_bias = WavLMEncoderLayer(cfg, i == 0, peft=self.peft, name=f"layers_{i}")(
                x, position_bias, key_mask)
        return norm(x) if cfg.do_stable_layer_norm else x


class WavLMEncoder(nn.Module):
    """WavLM from raw samples to the last hidden state, with each row's valid frame count."""

    config: WavLMEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, input_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """input_values [B, T] (16 kHz), attention_mask [B, T] (1 = sample, right-padded).

        Returns (features [B, frames, hidden_size], valid_lengths [B] int32). With a mask (and the
        preprocessor's return_attention_mask), padded frames are zeroed and never attended to.
        """
        cfg = self.config
        if input_values.ndim != 2:
            raise ValueError(f"WavLMEncoder: input_values must be [batch, samples], got {input_values.shape}")
        x = FeatureExtractor(cfg, peft=self.peft, name="feature_extractor")(input_values)
        frames = x.shape[1]
        if attention_mask is None:
            lengths = jnp.full((x.shape[0],), frames, jnp.int32)
        else:
            counts = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
            lengths = jnp.clip(output_lengths(cfg, counts), 0, frames).astype(jnp.int32)
        x = FeatureProjection(cfg, peft=self.peft, name="feature_projection")(x)
        key_mask = None
        if attention_mask is not None and cfg.use_attention_mask:
            key_mask = jnp.arange(frames)[None, :] < lengths[:, None]  # [B, frames]
        return TransformerEncoder(cfg, peft=self.peft, name="encoder")(x, key_mask), lengths


def _tensor_source(index: TensorIndex, prefix: str) -> Callable[[tuple[str, ...]], tuple[str, Callable]]:
    """Maps a parameter path of `WavLMEncoder` to its HF tensor name and conversion."""
    def source(path: tuple[str, ...]) -> tuple[str, Callable]:
        *mods, leaf = path
        parts = []
        for m in mods:
            head, _, tail = m.rpartition("_")
            parts.extend([head, tail] if head and tail.isdigit() else [m])
        if mods and mods[-1] == "pos_conv_embed":
            base = prefix + ".".join(parts + ["conv"]) + "."
            if leaf == "bias":
                return base + "bias", lambda w: w
            names = [base + n for n in _WEIGHT_NORM_KEYS[leaf]]
            return next((n for n in names if n in index), names[0]), lambda w: w
        if leaf == "rel_attn_embed":
            return prefix + ".".join(parts + ["rel_attn_embed", "weight"]), lambda w: w
        if leaf == "gru_rel_pos_const":
            return prefix + ".".join(parts + [leaf]), lambda w: w
        name = prefix + ".".join(parts + ["bias" if leaf == "bias" else "weight"])
        if leaf != "kernel":
            return name, lambda w: w
        return name, conv_kernel if mods[-1] == "conv" else linear_kernel
    return source


def load_wavlm(path: str | os.PathLike, dtype: Any = jnp.float32,
               peft: PeftMethod | None = None) -> tuple[WavLMEncoder, dict]:
    """Loads a WavLM checkpoint directory (WavLMModel, or a task model whose weights sit under 'wavlm.')."""
    hf, cfg_file = read_config(path, MODEL_TYPES)
    preprocessor_file = Path(path) / "preprocessor_config.json"
    preprocessor = None
    if preprocessor_file.exists():
        try:
            preprocessor = json.loads(preprocessor_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{preprocessor_file}: invalid JSON ({e})") from e
    dtype = jnp.dtype(dtype)
    cfg = dataclasses.replace(config_from_hf(hf, cfg_file, preprocessor), dtype=dtype.name, param_dtype=dtype.name)
    encoder = WavLMEncoder(cfg, peft=peft)
    index = TensorIndex(path)
    prefix = tensor_prefix(index, ("wavlm.", ""), "feature_projection.projection.weight", path)
    samples = jnp.zeros((1, min_samples(cfg)), dtype)
    abstract = jax.eval_shape(encoder.init, jax.random.key(0), samples)["params"]
    params, used = read_params(index, abstract, _tensor_source(index, prefix), dtype, path)
    used |= {prefix + name for name in _IGNORED}
    check_unexpected(index, used, prefix if prefix else "", path, "WavLM encoder")
    return encoder, params


def min_samples(config: WavLMEncoderConfig) -> int:
    """The fewest samples that give one output frame (to trace the module's shapes)."""
    samples = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        samples = (samples - 1) * stride + kernel
    return samples
