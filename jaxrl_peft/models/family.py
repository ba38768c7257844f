"""The interface both model families implement, and `load`, which picks the family from the checkpoint.

The sampler, the GRPO task and the supervised task see a model only through `Family`: load from a path,
the tokenizer and its stop ids, logits, token log-probs for training, parameter logical axes, whether
rows may be packed with segment ids, and decoding (state init, prefill from tokens or embeddings, one
step, the state after the last token). The modules' own `__call__` stay as they are; a family wraps one.

`jaxrl_peft` never imports `rwkv_jax`: `FAMILIES` names each family's loader as 'module:function',
resolved with importlib (the family registry), and `WRAPPERS` does the same for bare modules.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrl_peft.models import hf, transformer as tfm
from jaxrl_peft.models.safetensors_io import CheckpointError
from jaxrl_peft.peft.base import PeftMethod

Array = jax.Array

# Family name -> 'module:function' of its loader: fn(path, dtype, compute_dtype, mesh) -> (Family, params).
FAMILIES: dict[str, str] = {
    "decoder": "jaxrl_peft.models.family:load_decoder",
    "rwkv7": "rwkv_jax.model:load_family",
    "modrwkv": "rwkv_jax.modrwkv:load_family",
}
# A bare linen module's class ('module.Class') -> 'module:function' wrapping it as a Family.
WRAPPERS: dict[str, str] = {
    "jaxrl_peft.models.transformer.Transformer": "jaxrl_peft.models.family:DecoderFamily",
    "rwkv_jax.model.RWKV7": "rwkv_jax.model:RWKV7Family",
    "rwkv_jax.modrwkv.ModRWKV": "rwkv_jax.modrwkv:ModRWKVFamily",
}
RWKV7_ARCHITECTURE = "rwkv7-x070"  # config.json "architecture" of an RWKV-7 safetensors directory
MODRWKV_ARCHITECTURE = "modrwkv"  # config.json "architecture" of a ModRWKV directory (rwkv_jax.modrwkv.save)


@runtime_checkable
class Family(Protocol):
    """What the sampler and the tasks use of a model; `module` is the linen module it wraps."""

    name: ClassVar[str]
    packs_segments: ClassVar[bool]  # whether rows may hold several examples told apart by segment ids
    continues_state: ClassVar[bool]  # whether prefill may start from a state a previous call returned
    module: nn.Module
    path: str | None  # the checkpoint it was loaded from (tokenizer files live there)

    @property
    def config(self) -> Any:
        """The module's architecture config."""

    def with_peft(self, method: PeftMethod | None, remat: bool | None = None) -> "Family":
        """The same family and weights layout, its module built with `method` (and remat)."""

    def param_axes(self) -> Any:
        """Logical axis names of every parameter (a tuple per leaf, nested like the params)."""

    def tokenizer(self) -> hf.Tokenizer:
        """The checkpoint's tokenizer with its chat template and pad id."""

    def stop_ids(self, tokenizer: hf.Tokenizer) -> list[int]:
        """The token ids that end a completion."""

    def logits(self, variables: dict, tokens: Array) -> Array:
        """fp32 logits [B, T, V] of right-padded (or unpadded) tokens [B, T]."""

    def token_logprobs(self, variables: dict, tokens: Array, positions: Array | None = None,
                       segment_ids: Array | None = None, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[Array, Array | None]:
        """log p(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1] under softmax(logits / temperature), and
        the entropy when asked. Segment ids only where `packs_segments`."""

    def init_state(self, batch: int, max_len: int) -> Any:
        """An empty decode state for `batch` rows of at most `max_len` tokens (prompt + new)."""

    def state_axes(self, state: Any) -> Any:
        """Logical axis names of every leaf of `state` (for sharding it like the batch)."""

    def prefill(self, variables: dict, state: Any, tokens: Array | None, mask: Array,
                embeddings: Array | None = None) -> tuple[Array, Any]:
        """Feeds left-padded `tokens` [B, P] (or `embeddings` [B, P, D]) with `mask` [B, P] (False on
        pads): returns (fp32 logits [B, V] after the last position, the state after it)."""

    def decode_step(self, variables: dict, state: Any, tokens: Array, active: Array) -> tuple[Array, Any]:
        """Feeds one token per row, tokens [B]; rows where `active` [B] is False keep their state (as
        far as the family can). Returns (fp32 logits [B, V], the state after the token)."""


def tokenizer_at(path: str | os.PathLike | None) -> hf.Tokenizer:
    """The HF tokenizer files of a checkpoint directory (or of the directory holding a checkpoint file)."""
    if path is None:
        raise ValueError("this model was not loaded from a path, so it has no tokenizer files")
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (folder / "tokenizer.json").exists():
        raise CheckpointError(f"{folder}: no tokenizer.json (the family's tokenizer and chat template are read "
                              "from the checkpoint directory)")
    return hf.Tokenizer(folder)


# ------------------------------------------------------------------------------------------- decoder

@dataclasses.dataclass(frozen=True)
class DecoderFamily:
    """The R1-Distill decoder (Qwen2, Llama) behind the family interface; decodes over a KV cache.

    Decode state: {'cache': stacked KV cache, 'kv_mask' [B, S], 'positions' [B] (the next token's
    RoPE position), 'index' (the next cache slot)}.
    """

    module: tfm.Transformer
    path: str | None = None
    cache_dtype: Any = None

    name: ClassVar[str] = "decoder"
    continues_state: ClassVar[bool] = False  # the KV cache is sized for one call's prompt + new tokens
    packs_segments: ClassVar[bool] = True

    @property
    def cfg(self) -> tfm.TransformerConfig:
        return self.module.cfg

    @property
    def config(self) -> tfm.TransformerConfig:
        return self.module.cfg

    def with_peft(self, method: PeftMethod | None, remat: bool | None = None) -> "DecoderFamily":
        cfg = self.cfg if remat is None else self.cfg.replace(remat=remat)
        return dataclasses.replace(self, module=tfm.Transformer(cfg, peft=method))

    def param_axes(self) -> Any:
        return tfm.param_axes(self.cfg)

    def tokenizer(self) -> hf.Tokenizer:
        return tokenizer_at(self.path)

    def stop_ids(self, tokenizer: hf.Tokenizer) -> list[int]:
        return [t for t in dict.fromkeys((tokenizer.eos_id, self.cfg.eos_token_id)) if t is not None]

    def logits(self, variables: dict, tokens: Array) -> Array:
        return self.module.apply(variables, tokens).astype(jnp.float32)

    def token_logprobs(self, variables: dict, tokens: Array, positions: Array | None = None,
                       segment_ids: Array | None = None, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[Array, Array | None]:
        kwargs = {k: v for k, v in (("positions", positions), ("segment_ids", segment_ids)) if v is not None}
        return tfm.token_logprobs(self.module, variables, tokens, with_entropy=with_entropy,
                                  temperature=temperature, **kwargs)

    def init_state(self, batch: int, max_len: int) -> dict[str, Array]:
        return {"cache": tfm.init_cache(self.cfg, batch, max_len, self.cache_dtype),
                "kv_mask": jnp.ones((batch, max_len), jnp.bool_),
                "positions": jnp.zeros((batch,), jnp.int32), "index": jnp.zeros((), jnp.int32)}

    def state_axes(self, state: Any) -> Any:
        del state
        return {"cache": {"k": tfm.CACHE_AXES, "v": tfm.CACHE_AXES}, "kv_mask": ("batch", "length"),
                "positions": ("batch",), "index": ()}

    def prefill(self, variables: dict, state: Any, tokens: Array | None, mask: Array,
                embeddings: Array | None = None) -> tuple[Array, Any]:
        tokens = None if embeddings is not None else tokens  # embeddings [B, P, D] win, as in RWKV-7
        inputs = tokens if embeddings is None else embeddings
        if inputs is None or inputs.shape[:2] != mask.shape:
            raise ValueError(f"prefill needs tokens [B, P] or embeddings [B, P, D] matching mask {mask.shape}, "
                             f"got {None if inputs is None else inputs.shape}")
        p = mask.shape[1]
        kv_mask = jax.lax.dynamic_update_slice(state["kv_mask"], mask.astype(jnp.bool_), (0, 0))
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, cache = self.module.apply(variables, tokens, positions=positions, cache=state["cache"],
                                          cache_index=state["index"], kv_mask=kv_mask, embeddings=embeddings)
        lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
        return logits[:, -1].astype(jnp.float32), {"cache": cache, "kv_mask": kv_mask,
                                                   "positions": state["positions"] + lengths,
                                                   "index": state["index"] + p}

    def decode_step(self, variables: dict, state: Any, tokens: Array, active: Array) -> tuple[Array, Any]:
        del active  # a finished row's later slots are never read by its own tokens
        logits, cache = self.module.apply(variables, tokens[:, None], positions=state["positions"][:, None],
                                          cache=state["cache"], cache_index=state["index"],
                                          kv_mask=state["kv_mask"])
        return logits[:, 0].astype(jnp.float32), {"cache": cache, "kv_mask": state["kv_mask"],
                                                  "positions": state["positions"] + 1,
                                                  "index": state["index"] + 1}


def load_decoder(path: str | os.PathLike, dtype: Any = jnp.float32, compute_dtype: Any = None,
                 mesh: Mesh | None = None) -> tuple[DecoderFamily, dict]:
    """An HF decoder checkpoint directory as (DecoderFamily, params) (`hf.load` underneath)."""
    model, params = hf.load(path, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype)
    return DecoderFamily(model, str(path)), params


# ------------------------------------------------------------------------------------------- dispatch

def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def detect(path: str | os.PathLike) -> str:
    """The family of a checkpoint: an official RWKV-7 `.pth`, a directory (or file beside a config.json)
    whose config.json says "architecture": "rwkv7-x070", or an HF config.json naming a decoder."""
    path = Path(path)
    if path.suffix == ".pth":
        return "rwkv7"
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (expected an HF decoder directory, an RWKV-7 "
                              "safetensors directory or an official RWKV-7 .pth file)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    if isinstance(config, dict) and config.get("architecture") == RWKV7_ARCHITECTURE:
        return "rwkv7"
    if isinstance(config, dict) and config.get("architecture") == MODRWKV_ARCHITECTURE:
        return "modrwkv"
    hf.config_from_hf(config, str(cfg_file))  # names the file and field when it is no decoder either
    return "decoder"


def load(path: str | os.PathLike, dtype: Any = jnp.float32, compute_dtype: Any = None,
         mesh: Mesh | None = None) -> tuple[Family, dict]:
    """Loads a checkpoint of either family: returns (family, params).

    `dtype` is the parameter dtype; the model computes in `compute_dtype` (default: `dtype`). With a
    `mesh`, parameters are placed by their logical axes.
    """
    loader = _resolve(FAMILIES[detect(path)])
    return loader(path, dtype=jnp.dtype(dtype), compute_dtype=None if compute_dtype is None
                  else jnp.dtype(compute_dtype), mesh=mesh)


def of(model: Any) -> Family:
    """`model` as a Family: a Family is returned as it is, a bare module (`tfm.Transformer`, RWKV-7) is
    wrapped by the class `WRAPPERS` names for it."""
    cls = type(model)
    if isinstance(model, nn.Module):  # checked first: an unbound module's `path` raises, not returns
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key not in WRAPPERS:
            raise TypeError(f"no model family wraps {key}; known: {sorted(WRAPPERS)}")
        return _resolve(WRAPPERS[key])(model)
    if isinstance(model, Family):
        return model
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key not in WRAPPERS:
        raise TypeError(f"no model family wraps {key}; known: {sorted(WRAPPERS)}")
    return _resolve(WRAPPERS[key])(model)
