"""The Whisper audio encoder (ModRWKV's Whisper front end), loaded from a full Whisper checkpoint.

The decoder's tensors are ignored. Outputs equal transformers' `WhisperEncoder` `last_hidden_state`;
the valid length per row is what ModRWKV keeps of the window (30 s, or the checkpoint's chunk_length):
`attention_mask.sum() // 2 + 1` frames (JL-er/WorldRWKV `whisper_encoder.py`). Also holds the
checkpoint-reading helpers the audio encoders share (convolutions are `layers.Conv1D`, a `Linear` over
unfolded windows, so PEFT methods reach them).
`save_hf` writes an encoder as a Whisper checkpoint directory that transformers and `load_whisper` read
(the tiny embedded encoder ships that way); `init_for_training` starts a new one to pretrain.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.models.layers import Conv1D, LayerNorm, Linear, conv_kernel, conv_weight
from jaxrl_peft.models import hf as hf_io
from jaxrl_peft.models.safetensors_io import CheckpointError, TensorIndex, save_safetensors
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.peft.registry import nest
from rwkv_jax.encoders import audio as audio_lib

MODEL_TYPES = ("whisper",)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


# ---------------------------------------------------------------------------------------------
# Shared by the audio encoders

def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """A torch Linear weight [out, in] as a Linear kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def read_config(path: str | os.PathLike, model_types: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """config.json of a checkpoint directory, checked to be one of `model_types`: (dict, file name)."""
    hf, cfg_file = hf_io.read_config_json(path)
    if hf.get("model_type") not in model_types:
        raise CheckpointError(f"{cfg_file}: model_type {hf.get('model_type')!r}, expected one of {model_types}")
    return hf, str(cfg_file)


def tensor_prefix(index: TensorIndex, candidates: tuple[str, ...], probe: str, path: Any) -> str:
    """The first prefix p with `p + probe` in the checkpoint (models save with or without a wrapper)."""
    for prefix in candidates:
        if prefix + probe in index:
            return prefix
    raise CheckpointError(f"{path}: no tensor {probe!r} under any of the prefixes {candidates}")


def read_params(index: TensorIndex, abstract: Any, source: Callable[[tuple[str, ...]], tuple[str, Callable]],
                dtype: Any, path: Any) -> tuple[dict, set[str]]:
    """Fills the module's parameter tree from the checkpoint: (params, names of the tensors read).

    `source(param_path)` gives the checkpoint tensor name and the function turning it into the param.
    """
    dtype = jnp.dtype(dtype)
    items, used = [], set()
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
    for key_path, leaf in flat:
        param_path = tuple(k.key for k in key_path)
        name, convert = source(param_path)
        if name not in index:
            raise CheckpointError(f"{path}: checkpoint is missing tensor {name!r} "
                                  f"(for parameter {'/'.join(param_path)} of shape {tuple(leaf.shape)})")
        raw = index.get(name)
        value = convert(np.asarray(raw))
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{index.file_of(name)}: tensor {name!r} has shape {tuple(raw.shape)}, "
                                  f"which gives {tuple(value.shape)} for parameter {'/'.join(param_path)}; "
                                  f"expected {tuple(leaf.shape)} from config.json")
        used.add(name)
        items.append((param_path, jnp.asarray(value.astype(dtype))))
    return nest(items), used


def check_unexpected(index: TensorIndex, used: set[str], prefix: str, path: Any, kind: str) -> None:
    """Raises when the checkpoint holds tensors under `prefix` that the module has no parameter for."""
    unexpected = [n for n in index.keys() if n.startswith(prefix) and n not in used]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} for a {kind}")


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, H * Dh] -> [B, T, H, Dh]."""
    return x.reshape(*x.shape[:2], heads, -1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Softmax attention in fp32: q, k, v [B, T, H, Dh], additive bias [B, H, T, T] -> [B, T, H * Dh]."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, T, H, Dh]
    return out.reshape(*out.shape[:2], -1)


# ---------------------------------------------------------------------------------------------
# Whisper

@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """The encoder half of a Whisper config.json."""

    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> WhisperEncoderConfig:
    """Reads the encoder fields of an HF Whisper config dict."""
    try:
        cfg = WhisperEncoderConfig(
            num_mel_bins=hf["num_mel_bins"], d_model=hf["d_model"], encoder_layers=hf["encoder_layers"],
            encoder_attention_heads=hf["encoder_attention_heads"], encoder_ffn_dim=hf["encoder_ffn_dim"],
            max_source_positions=hf["max_source_positions"],
            activation_function=hf.get("activation_function", "gelu"))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from e
    if cfg.activation_function not in ACTIVATIONS:
        raise CheckpointError(f"{source}: activation_function {cfg.activation_function!r} is not supported; "
                              f"known: {sorted(ACTIVATIONS)}")
    if cfg.d_model % cfg.encoder_attention_heads:
        raise CheckpointError(f"{source}: d_model {cfg.d_model} is not divisible by "
                              f"encoder_attention_heads {cfg.encoder_attention_heads}")
    return cfg


class WhisperAttention(nn.Module):
    """Multi-head self-attention; the key projection has no bias, as in Whisper."""

    config: WhisperEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        lin = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        heads = cfg.encoder_attention_heads
        q = split_heads(Linear(cfg.d_model, ("embed", "heads"), True, name="q_proj", **lin)(x), heads)
        k = split_heads(Linear(cfg.d_model, ("embed", "heads"), False, name="k_proj", **lin)(x), heads)
        v = split_heads(Linear(cfg.d_model, ("embed", "heads"), True, name="v_proj", **lin)(x), heads)
        return Linear(cfg.d_model, ("heads", "embed"), True, name="out_proj", **lin)(attention(q, k, v))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    config: WhisperEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        lin = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        x = x + WhisperAttention(cfg, peft=self.peft, name="self_attn")(
            LayerNorm(name="self_attn_layer_norm", **lin)(x))
        h = LayerNorm(name="final_layer_norm", **lin)(x)
        h = ACTIVATIONS[cfg.activation_function](
            Linear(cfg.encoder_ffn_dim, ("embed", "mlp"), True, name="fc1", **lin)(h))
        return x + Linear(cfg.d_model, ("mlp", "embed"), True, name="fc2", **lin)(h)


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: two convolutions (the second halves the frame rate), positions, blocks."""

    config: WhisperEncoderConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, input_features: jax.Array,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """input_features [B, n_mels, 2 * max_source_positions], attention_mask [B, frames] (1 = audio).

        Returns (features [B, max_source_positions, d_model], valid_lengths [B] int32). The mask does
        not change the features (Whisper attends over the whole padded window); it sets the lengths.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        lin = dict(dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype), peft=self.peft)
        expected = 2 * cfg.max_source_positions
        if input_features.ndim != 3 or input_features.shape[1:] != (cfg.num_mel_bins, expected):
            raise ValueError(f"WhisperEncoder: input_features must be [batch, {cfg.num_mel_bins}, {expected}] "
                             f"(log-mel padded to the {expected / 100:g} s window), got {input_features.shape}")
        act = ACTIVATIONS["gelu"]
        x = jnp.swapaxes(input_features, 1, 2).astype(dtype)  # [B, frames, n_mels]
        x = act(Conv1D(cfg.d_model, (None, "embed"), True, kernel_size=3, stride=1, padding=1, name="conv1",
                       **lin)(x))
        x = act(Conv1D(cfg.d_model, (None, "embed"), True, kernel_size=3, stride=2, padding=1, name="conv2",
                       **lin)(x))
        positions = self.param("embed_positions", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("length", "embed")),
            (cfg.max_source_positions, cfg.d_model), jnp.dtype(cfg.param_dtype))
        x = x + positions.astype(dtype)[None]  # [B, max_source_positions, d_model]
        for i in range(cfg.encoder_layers):
            x = WhisperEncoderLayer(cfg, peft=self.peft, name=f"layers_{i}")(x)
        x = LayerNorm(name="layer_norm", **lin)(x)
        frames = x.shape[1]
        if attention_mask is None:
            lengths = jnp.full((x.shape[0],), frames, jnp.int32)
        else:
            lengths = jnp.minimum(jnp.sum(attention_mask.astype(jnp.int32), axis=-1) // 2 + 1, frames)
        return x, lengths.astype(jnp.int32)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed sinusoidal positions [length, channels] (sin half, then cos half), as transformers
    initialises `embed_positions`: the starting point of a new encoder."""
    if channels % 2 or channels < 4:
        raise ValueError(f"sinusoids: channels must be even and >= 4, got {channels}")
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :].astype(np.float32)
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def init_for_training(cfg: WhisperEncoderConfig, seed: int) -> dict:
    """A new Whisper encoder's params to train from scratch: the module's initialisers (key `seed`), except
    variance-preserving convolutions (std 1/sqrt(fan_in), so the mel features are not drowned by the
    positions at the start) and Whisper's sinusoidal positions."""
    example = jnp.zeros((1, cfg.num_mel_bins, 2 * cfg.max_source_positions), jnp.dtype(cfg.param_dtype))
    params = nn.unbox(WhisperEncoder(cfg).init(jax.random.key(seed), example)["params"])
    for index, name in enumerate(("conv1", "conv2")):
        kernel = params[name]["kernel"]  # [3 * in, out]
        params[name]["kernel"] = (jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1 + index), kernel.shape)
                                  / np.sqrt(kernel.shape[0])).astype(kernel.dtype)
    params["embed_positions"] = jnp.asarray(sinusoids(cfg.max_source_positions, cfg.d_model),
                                            jnp.dtype(cfg.param_dtype))
    return jax.device_get(params)


def _tensor_source(prefix: str) -> Callable[[tuple[str, ...]], tuple[str, Callable]]:
    """Maps a parameter path of `WhisperEncoder` to its HF tensor name and conversion."""
    def source(path: tuple[str, ...]) -> tuple[str, Callable]:
        if path == ("embed_positions",):
            return prefix + "embed_positions.weight", lambda w: w
        *mods, leaf = path
        parts = []
        for m in mods:
            parts.extend(["layers", m.split("_")[1]] if m.startswith("layers_") else [m])
        name = prefix + ".".join(parts + ["bias" if leaf == "bias" else "weight"])
        if leaf != "kernel":
            return name, lambda w: w
        return name, conv_kernel if mods[0] in ("conv1", "conv2") else linear_kernel
    return source


def load_whisper(path: str | os.PathLike, dtype: Any = jnp.float32,
                 peft: PeftMethod | None = None) -> tuple[WhisperEncoder, dict]:
    """Loads the encoder of a Whisper checkpoint directory (WhisperModel or ...ForConditionalGeneration)."""
    hf, cfg_file = read_config(path, MODEL_TYPES)
    dtype = jnp.dtype(dtype)
    cfg = dataclasses.replace(config_from_hf(hf, cfg_file), dtype=dtype.name, param_dtype=dtype.name)
    encoder = WhisperEncoder(cfg, peft=peft)
    index = TensorIndex(path)
    prefix = tensor_prefix(index, ("model.encoder.", "encoder."), "conv1.weight", path)
    features = jnp.zeros((1, cfg.num_mel_bins, 2 * cfg.max_source_positions), dtype)
    abstract = jax.eval_shape(encoder.init, jax.random.key(0), features)["params"]
    params, used = read_params(index, abstract, _tensor_source(prefix), dtype, path)
    check_unexpected(index, used, prefix, path, "Whisper encoder")
    return encoder, params


def config_to_hf(cfg: WhisperEncoderConfig) -> dict[str, Any]:
    """An HF Whisper config.json for the encoder `cfg`; the decoder fields describe the smallest valid
    decoder (one layer, a 4-token vocabulary), whose weights the directory does not hold."""
    return {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], "is_encoder_decoder": True,
        "num_mel_bins": cfg.num_mel_bins, "d_model": cfg.d_model, "encoder_layers": cfg.encoder_layers,
        "encoder_attention_heads": cfg.encoder_attention_heads, "encoder_ffn_dim": cfg.encoder_ffn_dim,
        "max_source_positions": cfg.max_source_positions, "activation_function": cfg.activation_function,
        "decoder_layers": 1, "decoder_attention_heads": cfg.encoder_attention_heads,
        "decoder_ffn_dim": cfg.d_model, "max_target_positions": 8, "vocab_size": 4, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1, "begin_suppress_tokens": None,
        "suppress_tokens": None, "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "use_cache": True,
        "tie_word_embeddings": True, "dtype": jnp.dtype(cfg.param_dtype).name,
    }


def save_hf(path: str | os.PathLike, cfg: WhisperEncoderConfig, params: dict) -> None:
    """Writes the encoder `params` as an HF Whisper checkpoint directory: config.json (`config_to_hf`),
    model.safetensors (tensors under 'model.encoder.' in torch layout, the inverse of `load_whisper`) and
    the preprocessor_config.json of a window of max_source_positions / 50 seconds."""
    if cfg.max_source_positions % 50:
        raise ValueError(f"save_hf: max_source_positions {cfg.max_source_positions} is not a whole number of "
                         "seconds (50 positions per second)")
    preprocessor = audio_lib.whisper_preprocessor_config(cfg.num_mel_bins, cfg.max_source_positions // 50)
    encoder = WhisperEncoder(cfg)
    features = jnp.zeros((1, cfg.num_mel_bins, 2 * cfg.max_source_positions), jnp.dtype(cfg.dtype))
    abstract = jax.eval_shape(encoder.init, jax.random.key(0), features)["params"]
    params = jax.device_get(nn.unbox(params))
    source = _tensor_source("model.encoder.")
    tensors = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]:
        param_path = tuple(k.key for k in key_path)
        value = params
        for key in param_path:
            if not isinstance(value, dict) or key not in value:
                raise ValueError(f"save_hf: params have no {'/'.join(param_path)} (shape {tuple(leaf.shape)})")
            value = value[key]
        value = np.asarray(value, np.dtype(cfg.param_dtype))
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"save_hf: {'/'.join(param_path)} has shape {value.shape}, the config gives "
                             f"{tuple(leaf.shape)}")
        name, _ = source(param_path)
        if param_path[-1] == "kernel":
            value = conv_weight(value, 3) if param_path[0] in ("conv1", "conv2") else np.ascontiguousarray(value.T)
        tensors[name] = value
    extra = len(jax.tree.leaves(params)) - len(tensors)
    if extra:
        raise ValueError(f"save_hf: params hold {extra} leaves the Whisper encoder of this config does not have")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2, sort_keys=True) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    save_safetensors(path / "model.safetensors", tensors)
