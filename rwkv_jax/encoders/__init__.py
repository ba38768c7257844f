"""ModRWKV's frozen-by-default encoders, loaded from Hugging Face checkpoint directories.

`load(path)` reads the directory's config.json and dispatches on its model_type through `LOADERS`.
Every loader has the signature `loader(path, hf_config, *, dtype, compute_dtype, mesh) -> (module, params)`
and returns a linen module whose `apply({'params': params}, inputs)` gives the features [B, N, D].
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import Mesh

import jax

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import hf
from jaxrl_peft.models.safetensors_io import CheckpointError
from rwkv_jax.encoders import vit, wavlm, whisper

Loader = Callable[..., tuple[nn.Module, dict]]


def _audio(load_fn: Callable[..., tuple[nn.Module, dict]]) -> Loader:
    """An audio loader (path, dtype) in the table's signature; its weights are replicated on `mesh`."""
    def loader(path: Path, hf_config: dict, *, dtype: Any, compute_dtype: Any = None, mesh: Mesh | None = None):
        del hf_config
        if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.dtype(dtype):
            raise ValueError(f"{path}: the audio encoders compute in their parameter dtype ({jnp.dtype(dtype).name})")
        encoder, params = load_fn(path, dtype=dtype)
        if mesh is not None:
            params = jax.device_put(params, mesh_lib.replicated(mesh))
        return encoder, params
    return loader

# ------------------------------------------------------------------------------------------------
# Dispatch table: model_type (config.json) -> loader.
LOADERS: dict[str, Loader] = {
    "siglip": vit.load_from_config,
    "siglip_vision_model": vit.load_from_config,
    "siglip2": vit.load_from_config,  # fixed-resolution only; NaFlex checkpoints raise CheckpointError
    "siglip2_vision_model": vit.load_from_config,
    "clip": vit.load_from_config,
    "clip_vision_model": vit.load_from_config,
    **{t: _audio(whisper.load_whisper) for t in whisper.MODEL_TYPES},
    **{t: _audio(wavlm.load_wavlm) for t in wavlm.MODEL_TYPES},
}
# ------------------------------------------------------------------------------------------------


def register(model_type: str, loader: Loader) -> None:
    """Makes `load` dispatch checkpoints of `model_type` to `loader`."""
    LOADERS[model_type] = loader


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a checkpoint directory, with errors that name the file."""
    return hf.read_config_json(path)[0]


def build(hf_config: dict[str, Any], preprocessor: dict[str, Any] | None = None, *, dtype: Any = jnp.float32,
          compute_dtype: Any = None, source: str = "config.json") -> tuple[nn.Module, jax.Array]:
    """The encoder module an HF config describes, without weights, and an input of one item to trace it
    with (`jax.eval_shape(module.init, key, example)` gives the parameter shapes). `preprocessor` is the
    checkpoint's preprocessor_config.json (WavLM reads its normalisation from it)."""
    model_type = hf_config.get("model_type")
    dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype or dtype)
    if model_type in whisper.MODEL_TYPES or model_type in wavlm.MODEL_TYPES:
        if compute != dtype:
            raise ValueError(f"{source}: the audio encoders compute in their parameter dtype ({dtype.name})")
    if model_type in whisper.MODEL_TYPES:
        cfg = dataclasses.replace(whisper.config_from_hf(hf_config, source), dtype=dtype.name, param_dtype=dtype.name)
        return whisper.WhisperEncoder(cfg), jnp.zeros((1, cfg.num_mel_bins, 2 * cfg.max_source_positions), dtype)
    if model_type in wavlm.MODEL_TYPES:
        cfg = dataclasses.replace(wavlm.config_from_hf(hf_config, source, preprocessor), dtype=dtype.name,
                                  param_dtype=dtype.name)
        return wavlm.WavLMEncoder(cfg), jnp.zeros((1, wavlm.min_samples(cfg)), dtype)
    if model_type in LOADERS and LOADERS[model_type] is vit.load_from_config:
        cfg = vit.config_from_hf(hf_config, source).replace(param_dtype=dtype.name, dtype=compute.name)
        return vit.VisionEncoder(cfg), jnp.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size), compute)
    raise CheckpointError(f"{source}: model_type {model_type!r} is not a supported encoder; known: {sorted(LOADERS)}")


def load(path: str | Path, dtype: Any = jnp.float32, compute_dtype: Any = None,
         mesh: Mesh | None = None) -> tuple[nn.Module, dict]:
    """Loads the encoder of an HF checkpoint directory: returns (encoder, params), fp32 by default."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise CheckpointError(f"{Path(path) / 'config.json'}: model_type {model_type!r} is not a supported "
                              f"encoder; known: {sorted(LOADERS)}")
    return LOADERS[model_type](Path(path), config, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
