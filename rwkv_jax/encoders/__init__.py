"""ModRWKV's frozen-by-default encoders, loaded from Hugging Face checkpoint directories.

`load(path)` reads the directory's config.json and dispatches on its model_type through `LOADERS`.
Every loader has the signature `loader(path, hf_config, *, dtype, compute_dtype, mesh) -> (module, params)`
and returns a linen module whose `apply({'params': params}, inputs)` gives the features [B, N, D].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrl_peft.models.safetensors_io import CheckpointError
from rwkv_jax.encoders import vit

Loader = Callable[..., tuple[nn.Module, dict]]

# ------------------------------------------------------------------------------------------------
# Dispatch table: model_type (config.json) -> loader. Vision towers are registered here; the audio
# encoders (whisper.py, wavlm.py) add their model_types ('whisper', 'wavlm', ...) below the marker,
# or call `register` from their own module.
LOADERS: dict[str, Loader] = {
    "siglip": vit.load_from_config,
    "siglip_vision_model": vit.load_from_config,
    "siglip2": vit.load_from_config,  # fixed-resolution only; NaFlex checkpoints raise CheckpointError
    "siglip2_vision_model": vit.load_from_config,
    "clip": vit.load_from_config,
    "clip_vision_model": vit.load_from_config,
    # --- audio encoders register here ---
}
# ------------------------------------------------------------------------------------------------


def register(model_type: str, loader: Loader) -> None:
    """Makes `load` dispatch checkpoints of `model_type` to `loader`."""
    LOADERS[model_type] = loader


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a checkpoint directory, with errors that name the file."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    return config


def load(path: str | Path, dtype: Any = jnp.float32, compute_dtype: Any = None,
         mesh: Mesh | None = None) -> tuple[nn.Module, dict]:
    """Loads the encoder of an HF checkpoint directory: returns (encoder, params), fp32 by default."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise CheckpointError(f"{Path(path) / 'config.json'}: model_type {model_type!r} is not a supported "
                              f"encoder; known: {sorted(LOADERS)}")
    return LOADERS[model_type](Path(path), config, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
