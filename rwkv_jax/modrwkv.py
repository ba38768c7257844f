"""The ModRWKV model: encoder -> (compressor) -> adapter -> spliced into RWKV-7's input embeddings.

Parallel forward for training (`ModRWKV.__call__` with the modality inputs), generation in RNN mode
through the shared sampler (`ModRWKVFamily`: encode once, prefill the spliced prompt in parallel, then
decode with the O(1) state); `Chat` carries the state across turns, so a conversation about one image
encodes it once and each turn feeds only its new tokens.

Checkpoints: `save` / `load` our directory (config.json + model.safetensors in the reference code's
later layout for the language model and connector + encoder.safetensors in our layout + tokenizer
files); `from_parts` builds a fresh model from an HF encoder directory and an RWKV-7 checkpoint (the
connector initialised, for stage 1); `from_reference` / `to_reference` read and write the reference
code's released checkpoints (either key layout) with `multimodal.import_reference/export_reference`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import hf, safetensors_io
from jaxrl_peft.models.layers import chunked_token_logprobs
from jaxrl_peft.models.safetensors_io import CheckpointError
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.peft.registry import nest
from jaxrl_peft.rl import rollout
from rwkv_jax import data, encoders, multimodal as mm
from rwkv_jax import model as rwkv
from rwkv_jax.encoders import audio as audio_lib, image as image_lib
from rwkv_jax.tokenizer import WorldTokenizer, world_tokenizer

Array = jax.Array
Params = dict[str, Any]

ARCHITECTURE = "modrwkv"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # language model + connector, the reference code's later key layout
ENCODER_FILE = "encoder.safetensors"  # the encoder, our parameter paths joined by '/'
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODALITIES = ("vision", "audio")
CHAT_FORMATS = {"later": mm.LATER, "paper": mm.PAPER_ERA}
# Dimensions of one modality item's input, per encoder kind (pixels [C, H, W], mels [n, frames], samples [T]).
_ITEM_NDIM = {"vision": 3, "whisper": 2, "wavlm": 1}


def _encoder_kind(model_type: str) -> str:
    if model_type in encoders.whisper.MODEL_TYPES:
        return "whisper"
    if model_type in encoders.wavlm.MODEL_TYPES:
        return "wavlm"
    return "vision"


@dataclasses.dataclass(frozen=True)
class ModRWKVConfig:
    """What a ModRWKV model is made of (hashable: the encoder's HF configs are held as JSON text).

    modality: 'vision' or 'audio'. compress: the Conv1d compressor before the vision adapter.
    adapter_ratio: the adapter's hidden width over the LM width (0 becomes the reference's 4 for vision,
    2 for audio). chat_format: 'later' (placeholders in the user turn) or 'paper' (modality tokens prepended;
    the reference's ASR data always prepends).
    """

    modality: str
    encoder_config: str  # the encoder's HF config.json, as JSON text
    rwkv: rwkv.RWKV7Config
    preprocessor_config: str = ""  # its preprocessor_config.json, as JSON text ('' when none)
    compress: bool = False
    adapter_ratio: int = 0
    chat_format: str = "later"

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"ModRWKVConfig.modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"ModRWKVConfig.chat_format must be one of {sorted(CHAT_FORMATS)}, "
                             f"got {self.chat_format!r}")
        if self.compress and self.modality != "vision":
            raise ValueError("ModRWKVConfig.compress: the Conv1d compressor belongs to the vision path")
        if not self.adapter_ratio:  # the reference's widths: 4C for vision, 2C for audio
            object.__setattr__(self, "adapter_ratio", 4 if self.modality == "vision" else 2)
        kind = _encoder_kind(self.encoder_hf.get("model_type", ""))
        if (kind == "vision") != (self.modality == "vision"):
            raise ValueError(f"ModRWKVConfig: a {self.encoder_hf.get('model_type')!r} encoder does not give "
                             f"{self.modality} features")

    @property
    def encoder_hf(self) -> dict[str, Any]:
        return json.loads(self.encoder_config)

    @property
    def preprocessor(self) -> dict[str, Any] | None:
        return json.loads(self.preprocessor_config) if self.preprocessor_config else None

    @property
    def encoder_kind(self) -> str:
        """'vision', 'whisper' or 'wavlm'."""
        return _encoder_kind(self.encoder_hf["model_type"])

    @property
    def format(self) -> mm.ChatFormat:
        fmt = CHAT_FORMATS[self.chat_format]
        return dataclasses.replace(fmt, marker="<audio>") if self.modality == "audio" else fmt

    def to_json(self) -> dict[str, Any]:
        return {"architecture": ARCHITECTURE, "modality": self.modality, "compress": self.compress,
                "adapter_ratio": self.adapter_ratio, "chat_format": self.chat_format, "rwkv": self.rwkv.arch_dict(),
                "encoder": self.encoder_hf, "preprocessor": self.preprocessor}


def _compact(embeds: Array, lengths: Array) -> Array:
    """[B, I, n, C] item outputs with valid lengths [B, I] -> [B, I * n, C], each row's valid tokens first,
    in item order (the slots of a row are filled in that order)."""
    b, items, n, c = embeds.shape
    valid = (jnp.arange(n)[None, None, :] < lengths[:, :, None]).reshape(b, items * n)
    order = jnp.argsort(~valid, axis=-1, stable=True)  # valid positions first, order kept
    return jnp.take_along_axis(embeds.reshape(b, items * n, c), order[..., None], axis=1)


def part_method(method: PeftMethod | None, part: str) -> PeftMethod | None:
    """The method a top-level part ('encoder', 'compressor', 'adapter', 'llm') is built with: the part's own
    under a per-part method (`peft.name='parts'`), else the one method of the whole model."""
    return method.part(part) if method is not None and hasattr(method, "part") else method


class ModRWKV(nn.Module):
    """encoder -> compressor (optional) -> adapter -> splice -> RWKV-7. Parameters: {'encoder',
    'compressor' (when compress), 'adapter', 'llm'}; the encoder is frozen unless a PEFT method targets it.

    `apply(vars, tokens [B, T], modality_inputs [B, I, ...], modality_mask [B, T])` -> (logits, state), the
    parallel forward; with `embeddings` [B, T, C] (from `prompt_embeddings`) in place of both, the RNN
    prefill and decode steps (`recurrent=True`) that generation uses.
    """

    config: ModRWKVConfig
    encoder: nn.Module
    peft: PeftMethod | None = None

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.rwkv.dtype, param_dtype=cfg.rwkv.param_dtype)
        if cfg.compress:
            self.compressor = mm.VisionCompressor(peft=part_method(self.peft, "compressor"), **kw)
        adapter = mm.VisionAdapter if cfg.modality == "vision" else mm.AudioAdapter
        self.adapter = adapter(cfg.rwkv.n_embd, cfg.adapter_ratio, peft=part_method(self.peft, "adapter"), **kw)
        self.llm = rwkv.RWKV7(cfg.rwkv, peft=part_method(self.peft, "llm"))

    def encode(self, inputs: Array | None, attention_mask: Array | None = None,
               item_mask: Array | None = None, *, features: Array | None = None,
               feature_lengths: Array | None = None) -> tuple[Array, Array]:
        """Modality items [B, I, ...] (or [B, ...]: one item per row) -> (embeddings [B, I * n, C] with each
        row's valid ones first, slot counts [B]). attention_mask [B, I, frames|samples] for audio;
        item_mask [B, I] False for absent items (they give no slots). `features` [B, I, N, D] (the frozen
        encoder's output, `encoder_features`, from a feature cache) in place of `inputs`, with
        `feature_lengths` [B, I] (the valid frames of audio items; ignored for images)."""
        cfg = self.config
        if features is not None:
            b, items = features.shape[:2]
            flat = features.reshape(b * items, *features.shape[2:])
            lengths = (jnp.full((b * items,), flat.shape[1], jnp.int32) if cfg.modality == "vision"
                       else jnp.asarray(feature_lengths, jnp.int32).reshape(b * items))
        else:
            item_ndim = _ITEM_NDIM[cfg.encoder_kind]
            if inputs.ndim == item_ndim + 1:
                inputs = inputs[:, None]
                attention_mask = None if attention_mask is None else attention_mask[:, None]
            if inputs.ndim != item_ndim + 2:
                raise ValueError(f"ModRWKV.encode: inputs must be [batch, items, ...] with {item_ndim} dims per "
                                 f"item, got shape {inputs.shape}")
            b, items = inputs.shape[:2]
            mask = None if attention_mask is None else attention_mask.reshape(b * items, -1)
            flat, lengths = self.encoder_features(inputs.reshape(b * items, *inputs.shape[2:]), mask)
        if cfg.modality == "audio":
            # the reference crops the encoder output to its valid frames before the adapter's padded conv
            valid = jnp.arange(flat.shape[1])[None, :] < lengths[:, None]
            flat = jnp.where(valid[..., None], flat, 0)
        if cfg.compress:
            flat = self.compressor(flat)
            lengths = jnp.full_like(lengths, flat.shape[1])
        embeds = self.adapter(flat)  # [B * I, n, C]
        if cfg.modality == "audio":
            lengths = jnp.minimum((lengths + 1) // 2 + 1, embeds.shape[1])  # mm.audio_adapter_length
        lengths = lengths.reshape(b, items)
        if item_mask is not None:
            lengths = jnp.where(item_mask, lengths, 0)
        return _compact(embeds.reshape(b, items, *embeds.shape[1:]), lengths), jnp.sum(lengths, axis=1)

    def encoder_features(self, inputs: Array, attention_mask: Array | None = None) -> tuple[Array, Array]:
        """The encoder alone: items [n, ...] -> (features [n, N, D], valid lengths [n]: N for images, the
        valid frames of audio). What a feature cache stores (the connector runs after it)."""
        if self.config.modality == "vision":
            features = self.encoder(inputs)
            return features, jnp.full((inputs.shape[0],), features.shape[1], jnp.int32)
        return self.encoder(inputs, attention_mask)

    def embed(self, tokens: Array) -> Array:
        """Token embeddings [B, T, C] (what modality embeddings are spliced into)."""
        return self.llm.embed(tokens)

    def prompt_embeddings(self, tokens: Array, modality_inputs: Array | None = None,
                          modality_mask: Array | None = None, attention_mask: Array | None = None,
                          item_mask: Array | None = None, features: Array | None = None,
                          feature_lengths: Array | None = None) -> Array:
        """The input embeddings [B, T, C] of a multimodal sequence: tokens embedded, modality slots replaced
        (the items' encoder inputs, or their cached encoder `features`: see `encode`)."""
        x = self.embed(tokens)
        if modality_inputs is None and features is None:
            return x
        embeds, counts = self.encode(modality_inputs, attention_mask, item_mask, features=features,
                                     feature_lengths=feature_lengths)
        return mm.splice(x, embeds, modality_mask, counts)

    def logits_from_hidden(self, hidden: Array) -> Array:
        return self.llm.logits_from_hidden(hidden)

    def init_all(self, tokens: Array, modality_inputs: Array) -> tuple[Array, Array]:
        """Touches every part (for `init`: the encoder, connector and language model, no splicing)."""
        return self.llm(tokens)[0], self.encode(modality_inputs)[0]

    def __call__(self, tokens: Array | None, modality_inputs: Array | None = None,
                 modality_mask: Array | None = None, state: rwkv.RWKV7State | None = None, *,
                 attention_mask: Array | None = None, item_mask: Array | None = None,
                 features: Array | None = None, feature_lengths: Array | None = None,
                 embeddings: Array | None = None, recurrent: bool = False, mask: Array | None = None,
                 return_hidden: bool = False) -> tuple[Array, rwkv.RWKV7State]:
        if embeddings is None:
            embeddings = self.prompt_embeddings(tokens, modality_inputs, modality_mask, attention_mask, item_mask,
                                                features, feature_lengths)
        return self.llm(None, state, embeddings=embeddings, recurrent=recurrent, mask=mask,
                        return_hidden=return_hidden)


def abstract_params(module: ModRWKV, example: Array) -> Any:
    """The boxed parameter shapes of `module` (example: one modality item, as `encoders.build` gives)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda key: module.init(key, tokens, example[None], method=ModRWKV.init_all)["params"],
                          jax.random.key(0))


def build_module(config: ModRWKVConfig, peft: PeftMethod | None = None) -> tuple[ModRWKV, Array]:
    """The module `config` describes and one modality item's example input."""
    encoder, example = encoders.build(config.encoder_hf, config.preprocessor, dtype=config.rwkv.param_dtype,
                                      compute_dtype=None if config.modality == "audio" else config.rwkv.dtype)
    encoder = encoder.clone(peft=part_method(peft, "encoder"))
    return ModRWKV(config, encoder, peft=peft), example


# ------------------------------------------------------------------------------------------------
# The family interface: what the shared sampler and the tasks use.

class WorldTokens:
    """The World tokenizer with the attributes the family interface reads (pad and eos ids)."""

    def __init__(self, tokenizer: WorldTokenizer | None = None):
        self.inner = tokenizer or world_tokenizer()
        self.eos_id = self.inner.eos_id
        self.pad_id = self.inner.eos_id
        self.vocab_size = self.inner.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, tokens: Sequence[int], skip_special_tokens: bool = False) -> str:
        del skip_special_tokens
        return self.inner.decode(tokens)


@dataclasses.dataclass(frozen=True)
class ModRWKVFamily:
    """ModRWKV behind `jaxrl_peft.models.family.Family`; the decode state is RWKV-7's, so a chat's next
    turn continues from the state the last one returned."""

    module: ModRWKV
    path: str | None = None

    name: ClassVar[str] = "modrwkv"
    packs_segments: ClassVar[bool] = False
    continues_state: ClassVar[bool] = True

    @property
    def config(self) -> ModRWKVConfig:
        return self.module.config

    def with_peft(self, method: PeftMethod | None, remat: bool | None = None) -> "ModRWKVFamily":
        cfg = self.config
        if remat is not None:
            cfg = dataclasses.replace(cfg, rwkv=dataclasses.replace(cfg.rwkv, remat=remat))
        encoder = self.module.encoder.clone(peft=part_method(method, "encoder"))
        return dataclasses.replace(self, module=ModRWKV(cfg, encoder, peft=method))

    def example_item(self) -> Array:
        return build_module(self.config)[1]

    def param_axes(self) -> Any:
        specs = nn.get_partition_spec(abstract_params(self.module, self.example_item()))
        return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    def tokenizer(self) -> Any:
        """The checkpoint's HF tokenizer when it has one (tiny models), else the RWKV World tokenizer."""
        if self.path is not None and (Path(self.path) / "tokenizer.json").exists():
            return hf.Tokenizer(self.path)
        return WorldTokens()

    def stop_ids(self, tokenizer: Any) -> list[int]:
        """The end of an assistant turn ('\\x17'), as the reference stops on it."""
        ids = tokenizer.encode(mm.TURN_END)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer has no single token for the turn end {mm.TURN_END!r} (got {ids})")
        return ids

    def logits(self, variables: dict, tokens: Array) -> Array:
        return self.module.apply(variables, tokens)[0]

    def token_logprobs(self, variables: dict, tokens: Array, positions: Array | None = None,
                       segment_ids: Array | None = None, temperature: float = 1.0, with_entropy: bool = False,
                       *, modality: Mapping[str, Array] | None = None) -> tuple[Array, Array | None]:
        """Right-padded rows, one conversation each; `modality`: {'inputs', 'mask'[, 'attention_mask',
        'item_mask']} as `ModRWKV.__call__` takes them (None: text only)."""
        del positions, segment_ids
        modality = dict(modality or {})
        hidden = self.module.apply(variables, tokens, modality.get("inputs"), modality.get("mask"),
                                   attention_mask=modality.get("attention_mask"),
                                   item_mask=modality.get("item_mask"), return_hidden=True)[0][:, :-1]
        head = lambda h: self.module.apply(variables, h, method=ModRWKV.logits_from_hidden)  # noqa: E731
        return chunked_token_logprobs(hidden, tokens[:, 1:], head, temperature=temperature,
                                      with_entropy=with_entropy)

    def init_state(self, batch: int, max_len: int) -> rwkv.RWKV7State:
        del max_len
        return rwkv.init_state(self.config.rwkv, batch)

    def state_axes(self, state: Any) -> Any:
        del state
        return rwkv.STATE_AXES

    def prefill(self, variables: dict, state: rwkv.RWKV7State, tokens: Array | None, mask: Array,
                embeddings: Array | None = None) -> tuple[Array, rwkv.RWKV7State]:
        if embeddings is None:
            embeddings = self.module.apply(variables, tokens, method=ModRWKV.embed)
        logits, state = self.module.apply(variables, None, state=state, embeddings=embeddings,
                                          mask=mask.astype(jnp.bool_))
        return logits[:, -1], state

    def decode_step(self, variables: dict, state: rwkv.RWKV7State, tokens: Array,
                    active: Array) -> tuple[Array, rwkv.RWKV7State]:
        embeddings = self.module.apply(variables, tokens[:, None], method=ModRWKV.embed)
        logits, state = self.module.apply(variables, None, state=state, embeddings=embeddings, recurrent=True,
                                          mask=active[:, None])
        return logits[:, 0], state

    # -------------------------------------------------------------- preprocessing of raw inputs
    def preprocess(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """Images (paths, PIL images or HWC arrays) or audio (paths at any rate, or 16 kHz waves) -> the encoder's
        inputs {'inputs': [n, ...], 'attention_mask': [n, ...] (audio)}, as the HF processors make them
        (Whisper: padded to the preprocessor's chunk_length, 30 s when it names none)."""
        cfg = self.config
        if cfg.modality == "vision":
            processor = image_lib.processor_config(cfg.preprocessor or {})
            return {"inputs": image_lib.preprocess(list(items), processor)}
        waves = [data.load_audio(x) for x in items]  # files decoded and resampled to 16 kHz
        if cfg.encoder_kind == "whisper":
            chunk = audio_lib.whisper_chunk_seconds(cfg.preprocessor, cfg.encoder_hf["max_source_positions"])
            features, mask = audio_lib.whisper_features(waves, n_mels=cfg.encoder_hf["num_mel_bins"],
                                                        chunk_seconds=chunk)
            return {"inputs": features, "attention_mask": mask}
        pre = cfg.preprocessor or {}
        values, mask = audio_lib.wavlm_inputs(waves, do_normalize=pre.get("do_normalize", True))
        return {"inputs": values, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------
# Checkpoints

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _flat(tree: Any) -> dict[str, Any]:
    """{'a/b/kernel': leaf} of a (boxed or plain) parameter tree."""
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
    return {"/".join(k.key for k in path): value for path, value in flat}


def _place(params: Params, abstract: Any, dtype: Any, mesh: Mesh | None) -> Params:
    """Casts the leaves to `dtype` and places them (by their logical axes on `mesh`, or on device 0)."""
    params = jax.tree.map(lambda x: np.asarray(x, dtype), params)
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.tree.map(jax.device_put, params, mesh_lib.param_shardings(abstract, mesh))


def _read_encoder(file: Path, abstract: Any) -> Params:
    """Our-layout encoder tensors, checked key for key and shape for shape against `abstract`."""
    index = safetensors_io.SafetensorsFile(file)
    want = {k: tuple(v.shape) for k, v in _flat(abstract).items()}
    missing = sorted(set(want) - set(index.keys()))
    unexpected = sorted(set(index.keys()) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{file}: tensors do not match the encoder of config.json: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    items = []
    for name, shape in want.items():
        if index.shape(name) != shape:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {index.shape(name)}, expected {shape}")
        items.append((tuple(name.split("/")), index.get(name)))
    return nest(items)


def config_from_json(data: Mapping[str, Any], source: str, dtype: Any, compute_dtype: Any,
                     remat: bool = False) -> ModRWKVConfig:
    """A ModRWKVConfig from our config.json's contents (what `ModRWKVConfig.to_json` writes)."""
    if not isinstance(data, Mapping) or data.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{source}: not a ModRWKV config (expected \"architecture\": \"{ARCHITECTURE}\")")
    try:
        arch = {k: int(v) for k, v in data["rwkv"].items()}
        llm = rwkv.RWKV7Config(**arch, dtype=compute_dtype, param_dtype=dtype, remat=remat)
        return ModRWKVConfig(modality=data["modality"], encoder_config=json.dumps(data["encoder"], sort_keys=True),
                             rwkv=llm, preprocessor_config=json.dumps(data["preprocessor"], sort_keys=True)
                             if data.get("preprocessor") else "", compress=bool(data.get("compress", False)),
                             adapter_ratio=int(data.get("adapter_ratio", 0)),
                             chat_format=data.get("chat_format", "later"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad ModRWKV config ({type(e).__name__}: {e})") from e


def save(path: str | os.PathLike, family: ModRWKVFamily, params: Params,
         tokenizer_from: str | os.PathLike | None = None) -> None:
    """Writes our directory: config.json, model.safetensors (LM + connector in the reference's later key
    layout), encoder.safetensors (our layout), and the tokenizer files of `tokenizer_from` (default: those
    of the checkpoint the family was loaded from, if any)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = family.config
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2))
    safetensors_io.save_safetensors(path / WEIGHTS_FILE, to_reference(family, params, "later", with_encoder=False),
                                    metadata={"format": ARCHITECTURE})
    safetensors_io.save_safetensors(path / ENCODER_FILE, {k: np.asarray(v) for k, v in _flat(params["encoder"]).items()},
                                    metadata={"format": ARCHITECTURE})
    source = tokenizer_from if tokenizer_from is not None else family.path
    if source is not None and Path(source).resolve() != path.resolve():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copyfile(Path(source) / name, path / name)


def load(path: str | os.PathLike, dtype: Any = jnp.float32, compute_dtype: Any = None,
         mesh: Mesh | None = None, remat: bool = False) -> tuple[ModRWKVFamily, Params]:
    """Reads a directory `save` wrote: returns (family, params)."""
    path = Path(path)
    data = _read_json(path / CONFIG_FILE)
    if data is None:
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (expected a ModRWKV directory written by modrwkv.save)")
    dtype = jnp.dtype(dtype)
    cfg = config_from_json(data, str(path / CONFIG_FILE), dtype, jnp.dtype(compute_dtype or dtype), remat)
    module, example = build_module(cfg)
    abstract = abstract_params(module, example)
    checkpoint = mm.import_reference(safetensors_io.SafetensorsFile(path / WEIGHTS_FILE).load_all(),
                                     str(path / WEIGHTS_FILE))
    params = _parts(cfg, checkpoint, _read_encoder(path / ENCODER_FILE, abstract["encoder"]), str(path))
    return ModRWKVFamily(module, str(path)), _place(params, abstract, dtype, mesh)


def _parts(cfg: ModRWKVConfig, checkpoint: mm.ReferenceCheckpoint, encoder_params: Params, source: str) -> Params:
    """Our parameter tree from an imported reference checkpoint and the encoder's params."""
    if checkpoint.modality != cfg.modality:
        raise CheckpointError(f"{source}: the checkpoint holds a {checkpoint.modality} connector, the config "
                              f"says {cfg.modality}")
    if (checkpoint.compressor is not None) != cfg.compress:
        raise CheckpointError(f"{source}: compressor {'present' if checkpoint.compressor else 'absent'} in the "
                              f"checkpoint but compress={cfg.compress} in the config")
    llm_config = rwkv.detect_config(checkpoint.rwkv, source)
    if llm_config.arch_dict() != cfg.rwkv.arch_dict():
        raise CheckpointError(f"{source}: the language model's tensors are {llm_config.arch_dict()}, the config "
                              f"says {cfg.rwkv.arch_dict()}")
    rwkv.check_tensors(checkpoint.rwkv, cfg.rwkv, source)
    params = {"encoder": encoder_params, "adapter": checkpoint.adapter,
              "llm": rwkv.params_from_official(checkpoint.rwkv, cfg.rwkv, jnp.float32)}
    if cfg.compress:
        params["compressor"] = checkpoint.compressor
    return jax.tree.map(np.asarray, nn.unbox(params))


def to_reference(family: ModRWKVFamily, params: Params, layout: str = "later",
                 with_encoder: bool = True, encoder_tensors: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """The reference code's state dict of this model (`layout` 'later' or 'paper'). The encoder's tensors
    go in under their reference names only when given (`encoder_tensors`, reference names, e.g. from
    `from_reference`); `with_encoder=False` leaves them out."""
    cfg = family.config
    params = jax.tree.map(np.asarray, nn.unbox(params))
    checkpoint = mm.ReferenceCheckpoint(
        rwkv=rwkv.params_to_official(params["llm"], cfg.rwkv), adapter=params["adapter"],
        compressor=params.get("compressor"), encoder=dict(encoder_tensors or {}) if with_encoder else {},
        layout=layout, modality=cfg.modality)
    return mm.export_reference(checkpoint)


def _new_config(encoder_path: Path, llm_config: rwkv.RWKV7Config, modality: str | None, compress: bool,
                adapter_ratio: int, chat_format: str | None) -> ModRWKVConfig:
    hf_config = encoders.read_config(encoder_path)
    preprocessor = _read_json(encoder_path / "preprocessor_config.json")
    kind = _encoder_kind(hf_config.get("model_type", ""))
    modality = modality or ("vision" if kind == "vision" else "audio")
    chat_format = chat_format or ("later" if modality == "vision" else "paper")
    return ModRWKVConfig(modality, json.dumps(hf_config, sort_keys=True), llm_config,
                         json.dumps(preprocessor, sort_keys=True) if preprocessor else "", compress, adapter_ratio,
                         chat_format)


def from_parts(encoder_path: str | os.PathLike, rwkv_path: str | os.PathLike, *, compress: bool = False,
               adapter_ratio: int = 0, chat_format: str | None = None, seed: int = 0, dtype: Any = jnp.float32,
               compute_dtype: Any = None, mesh: Mesh | None = None) -> tuple[ModRWKVFamily, Params]:
    """A new ModRWKV from an HF encoder directory and an RWKV-7 checkpoint, its connector initialised from
    `seed` as the reference initialises it (stage 1 trains it). The tokenizer is the RWKV checkpoint's."""
    dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype or dtype)
    llm_family, llm_params = rwkv.load_family(str(rwkv_path), dtype=dtype, compute_dtype=compute)
    cfg = _new_config(Path(encoder_path), llm_family.config, None, compress, adapter_ratio, chat_format)
    module, example = build_module(cfg)
    _, encoder_params = encoders.load(encoder_path, dtype=dtype,
                                      compute_dtype=None if cfg.modality == "audio" else compute)
    fresh = module.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32), example[None],
                        method=ModRWKV.init_all)["params"]
    params = {name: nn.unbox(fresh[name]) for name in fresh if name not in ("encoder", "llm")}
    params.update(encoder=encoder_params, llm=llm_params)
    params = jax.tree.map(np.asarray, params)
    rwkv_dir = Path(rwkv_path) if Path(rwkv_path).is_dir() else Path(rwkv_path).parent
    return ModRWKVFamily(module, str(rwkv_dir)), _place(params, abstract_params(module, example), dtype, mesh)


def from_reference(checkpoint_file: str | os.PathLike, encoder_path: str | os.PathLike, *,
                   adapter_ratio: int = 0, chat_format: str | None = None, dtype: Any = jnp.float32,
                   compute_dtype: Any = None, mesh: Mesh | None = None) -> tuple[ModRWKVFamily, Params]:
    """A released reference checkpoint (.safetensors or .pth, either key layout) with the HF directory of its
    encoder (config and preprocessor; the weights too when the checkpoint did not save the encoder's)."""
    checkpoint_file = Path(checkpoint_file)
    if checkpoint_file.suffix == ".pth":
        tensors = rwkv._read_pth(str(checkpoint_file))
    else:
        tensors = safetensors_io.SafetensorsFile(checkpoint_file).load_all()
    checkpoint = mm.import_reference(tensors, str(checkpoint_file))
    if checkpoint.modality is None:
        raise CheckpointError(f"{checkpoint_file}: holds no connector (a plain RWKV-7 checkpoint?)")
    dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype or dtype)
    llm_config = dataclasses.replace(rwkv.detect_config(checkpoint.rwkv, str(checkpoint_file)), dtype=compute,
                                     param_dtype=dtype)
    cfg = _new_config(Path(encoder_path), llm_config, checkpoint.modality, checkpoint.compressor is not None,
                      adapter_ratio or _adapter_ratio(checkpoint, llm_config.n_embd), chat_format
                      or ("paper" if checkpoint.layout == "paper" else None))
    module, example = build_module(cfg)
    encode_compute = None if cfg.modality == "audio" else compute
    if checkpoint.encoder:
        with tempfile.TemporaryDirectory() as tmp:  # the loaders read an HF directory: write one
            for name in ("config.json", "preprocessor_config.json"):
                if (Path(encoder_path) / name).exists():
                    shutil.copyfile(Path(encoder_path) / name, Path(tmp) / name)
            safetensors_io.save_safetensors(Path(tmp) / "model.safetensors", mm.encoder_hf_tensors(checkpoint))
            _, encoder_params = encoders.load(tmp, dtype=dtype, compute_dtype=encode_compute)
    else:
        _, encoder_params = encoders.load(encoder_path, dtype=dtype, compute_dtype=encode_compute)
    params = _parts(cfg, checkpoint, jax.tree.map(np.asarray, encoder_params), str(checkpoint_file))
    folder = checkpoint_file.parent
    return ModRWKVFamily(module, str(folder)), _place(params, abstract_params(module, example), dtype, mesh)


def _adapter_ratio(checkpoint: mm.ReferenceCheckpoint, n_embd: int) -> int:
    """The adapter's hidden width over the LM width, read off its first layer."""
    return int(np.asarray(nn.unbox(checkpoint.adapter)["fc1"]["bias"]).shape[0]) // n_embd


def load_family(path: str, dtype: Any = jnp.float32, compute_dtype: Any = None,
                mesh: Mesh | None = None) -> tuple[ModRWKVFamily, Params]:
    """The family registry's loader."""
    return load(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)


# ------------------------------------------------------------------------------------------------
# Chat: generation in RNN mode, the state carried across turns.

class Chat:
    """A multi-turn conversation with one ModRWKV model, one row.

    Each turn feeds only its new tokens on the state the previous turn left (the modality items are
    encoded once, in the turn that brings them); `history` holds every token fed or generated and
    `modality_mask` its slots (`generated`: the model's tokens), so the whole conversation can be re-run in
    parallel mode.
    """

    def __init__(self, family: ModRWKVFamily, variables: dict, sampling: rollout.SamplingConfig,
                 tokenizer: Any = None, seed: int = 0):
        self.family = family
        self.variables = variables
        self.tokenizer = tokenizer or family.tokenizer()
        self.stop_ids = family.stop_ids(self.tokenizer)
        self.sampler = rollout.Sampler(family, sampling, pad_id=getattr(self.tokenizer, "pad_id", None) or 0,
                                       stop_tokens=self.stop_ids)
        self.key = jax.random.key(seed)
        self.state: rwkv.RWKV7State | None = None
        self.history: list[int] = []
        self.modality_mask: list[bool] = []
        self.generated: list[bool] = []  # which tokens of `history` the model generated
        self.items: list[dict[str, np.ndarray]] = []  # the encoder inputs of every item, in order
        self.closed = True  # whether the last assistant turn ended with its stop token
        self._embed = jax.jit(lambda v, t, x, m, a: family.module.apply(
            v, t, x, m, a, method=ModRWKV.prompt_embeddings))
        self._lengths = jax.jit(lambda v, x, a: family.module.apply(v, x, a, method=ModRWKV.encode)[1])

    def turn_tokens(self, text: str, lengths: Sequence[int]) -> tuple[list[int], list[bool]]:
        """The tokens (and slot mask) of a user turn with `lengths` modality slots, then the assistant header."""
        fmt = self.family.config.format
        if fmt.layout == "placeholder" and lengths:
            text = fmt.marker * (len(lengths) - text.count(fmt.marker)) + text
        if not text and fmt.layout == "prepend":  # the reference's ASR prompt: audio, then the header
            ids, mask = [mm.PREPEND_SLOT_ID] * sum(lengths), [True] * sum(lengths)
        else:
            example = mm.format_conversation([{"from": "human", "value": text}], lengths, fmt, self.tokenizer)
            ids, mask = example.input_ids.tolist(), example.modality_mask.tolist()
        header = self.tokenizer.encode(f"{mm.TURN_START}Assistant:")
        if not self.closed:  # the last answer hit its token budget: close its turn first
            ids, mask = self.stop_ids[:1] + ids, [False] + mask
        vocab = self.family.config.rwkv.vocab_size
        ids = ids + header
        if max(ids) >= vocab:
            raise ValueError(f"token id {max(ids)} is outside the model's {vocab}-row vocabulary (the placeholder "
                             "chat format needs the World vocabulary's special ids; use chat_format 'paper')")
        return ids, mask + [False] * len(header)

    def ask(self, text: str, items: Sequence[Any] = (), on_text: Callable[[str], None] | None = None) -> str:
        """One turn: `items` are this turn's images or audio clips (paths or arrays); returns the answer and
        streams it through `on_text` piece by piece when given."""
        inputs = self.family.preprocess(items) if items else None
        lengths: list[int] = []
        if inputs is not None:
            x, a = jnp.asarray(inputs["inputs"])[None], inputs.get("attention_mask")
            a = None if a is None else jnp.asarray(a)[None]
            counts = self._lengths(self.variables, x, a)
            if x.shape[1] > 1 and self.family.config.modality == "audio":
                raise ValueError("one audio clip per turn")
            lengths = [int(counts[0])] if len(items) == 1 else self._item_lengths(inputs)
        ids, mask = self.turn_tokens(text, lengths)
        tokens = np.asarray([ids], np.int32)
        slot_mask = np.asarray([mask], bool)
        embeddings = None
        if inputs is not None:
            a = inputs.get("attention_mask")
            embeddings = self._embed(self.variables, tokens, jnp.asarray(inputs["inputs"])[None], slot_mask,
                                     None if a is None else jnp.asarray(a)[None])
            self.items.append(inputs)
        self.key, key = jax.random.split(self.key)
        pieces: list[int] = []
        printed = [""]

        def on_step(step: rollout.Step) -> None:
            if not step.active[0] or on_text is None:
                return
            pieces.append(int(step.tokens[0]))
            text_now = self.tokenizer.decode([t for t in pieces if t not in self.stop_ids])
            if len(text_now) > len(printed[0]) and not text_now.endswith("\ufffd"):
                on_text(text_now[len(printed[0]):])
                printed[0] = text_now

        out, self.state = self.sampler.stream(self.variables, tokens, np.ones_like(slot_mask), key, on_step,
                                              embeddings=embeddings, state=self.state)
        length = int(out.lengths[0])
        generated = np.asarray(out.tokens[0][:length]).tolist()
        self.history += ids + generated
        self.modality_mask += mask + [False] * length
        self.generated += [False] * len(ids) + [True] * length
        self.closed = bool(out.finished[0])
        return self.tokenizer.decode(generated[:length - int(self.closed)])

    def _item_lengths(self, inputs: dict[str, np.ndarray]) -> list[int]:
        """Slots of each item of a multi-image turn (each is encoded on its own to count them)."""
        out = []
        for i in range(len(inputs["inputs"])):
            out.append(int(self._lengths(self.variables, jnp.asarray(inputs["inputs"][i:i + 1])[None], None)[0]))
        return out
