"""Hugging Face checkpoints <-> parameter trees, and the tokenizer with its chat template.

Weights are read tensor by tensor from memory-mapped safetensors files (single or sharded) and placed
on the devices with their sharding, so no full host copy of a large model is ever made.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import transformer as tfm
from jaxrl_peft.models.safetensors_io import CheckpointError, TensorIndex, save_safetensors
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.registry import nest

_ARCHS = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_TORCH_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# ---------------------------------------------------------------------------------------------
# config.json <-> TransformerConfig

_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")


def check_field_types(hf: dict[str, Any], source: str) -> None:
    """Refuses config.json values of the wrong type (`"hidden_size": "128"`), naming the file and field."""
    for name in _INT_FIELDS:
        v = hf.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise CheckpointError(f"{source}: field {name!r} must be a positive integer, got {v!r}")
    for name in _FLOAT_FIELDS:
        v = hf.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise CheckpointError(f"{source}: field {name!r} must be a number, got {v!r}")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> tfm.TransformerConfig:
    """Reads an HF config dict (Qwen2ForCausalLM / LlamaForCausalLM); values are type-checked."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    check_field_types(hf, source)
    archs = hf.get("architectures") or []
    arch = next((_ARCHS[a] for a in archs if a in _ARCHS), None) or _ARCHS.get(
        {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(hf.get("model_type", ""), ""))
    if arch is None:
        raise CheckpointError(f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                              f"expected one of {sorted(_ARCHS)}")
    try:
        heads = hf["num_attention_heads"]
        scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        rope_type = scaling.get("rope_type", scaling.get("type"))
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
        elif rope_type not in (None, "default"):
            raise CheckpointError(f"{source}: rope_scaling type {rope_type!r} is not supported")
        theta = hf.get("rope_theta", scaling.get("rope_theta", 10_000.0))
        eos = hf.get("eos_token_id")
        return tfm.TransformerConfig(
            arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=float(theta),
            rope_scaling=rope_scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 131_072),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from e


def config_to_hf(cfg: tfm.TransformerConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json transformers expects for this model."""
    hf: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": cfg.arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu", "torch_dtype": _TORCH_DTYPE.get(dtype, "float32"),
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "attention_dropout": 0.0, "use_cache": True,
    }
    if cfg.arch == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = False
    if cfg.rope_scaling is not None:
        f, lo, hi, old = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                              "high_freq_factor": hi, "original_max_position_embeddings": old}
    if cfg.arch == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return hf


# ---------------------------------------------------------------------------------------------
# parameter paths <-> HF tensor names

def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF tensor name, transpose?) for a parameter path such as ('layers_0','mlp','up_proj','kernel')."""
    *mods, leaf = path
    parts = []
    for m in mods:
        match = re.fullmatch(r"layers_(\d+)", m)
        parts.extend(["layers", match.group(1)] if match else [m])
    prefix = "" if mods and mods[0] == "lm_head" else "model."
    leaf_name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return prefix + ".".join(parts + [leaf_name]), leaf == "kernel"


def _paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    return [(tuple(k.key for k in kp), v) for kp, v in flat]


_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def read_config_json(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The config.json of a checkpoint directory as a dict, and its file; errors name the file."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    return config, cfg_file


def load(path: str | os.PathLike, dtype: Any = jnp.bfloat16, mesh: Mesh | None = None,
         compute_dtype: Any = None, rules=mesh_lib.LOGICAL_RULES, scan_layers: bool = True
         ) -> tuple[tfm.Transformer, dict]:
    """Loads an HF checkpoint directory: returns (model, params).

    Each tensor is read from the mapped file, cast to `dtype` and placed with its sharding on `mesh`
    (default: the first device), one device slice at a time. With `scan_layers` the decoder layers are
    stacked ([L, ...] under `layers`), each device slice still read layer by layer from the mapped files.
    """
    path = Path(path)
    hf_cfg, cfg_file = read_config_json(path)
    dtype = jnp.dtype(dtype)
    cfg = config_from_hf(hf_cfg, str(cfg_file)).replace(
        param_dtype=dtype.name, dtype=jnp.dtype(compute_dtype or dtype).name, scan_layers=scan_layers)
    index = TensorIndex(path)
    abstract = tfm.abstract_params(cfg)
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                 nn.unbox(abstract))
    else:
        shardings = mesh_lib.param_shardings(abstract, mesh, rules)
    flat_shard = dict(_paths(shardings))
    used, items = set(), []
    for p, leaf in _paths(abstract):
        if p == ("lm_head", "kernel") and cfg.tie_embeddings:
            continue
        stacked = p[0] == registry.LAYERS
        layer_paths = [(f"layers_{i}",) + p[1:] for i in range(cfg.num_layers)] if stacked else [p]
        layer_shape = leaf.value.shape[1:] if stacked else leaf.value.shape
        raws = []
        for lp in layer_paths:
            name, transpose = hf_name(lp)
            want = tuple(reversed(layer_shape)) if transpose else tuple(layer_shape)
            if name not in index:
                raise CheckpointError(f"{path}: checkpoint is missing tensor {name!r} (expected shape {want})")
            raw = index.get(name)
            if tuple(raw.shape) != want:
                raise CheckpointError(f"{index.file_of(name)}: tensor {name!r} has shape {tuple(raw.shape)}, "
                                      f"expected {want} from {cfg_file.name}")
            used.add(name)
            raws.append(raw.T if transpose else raw)
        items.append((p, _place_stacked(raws, dtype, flat_shard[p]) if stacked
                      else _place(raws[0], dtype, flat_shard[p])))
    unexpected = [n for n in index.where if n not in used and not _IGNORED.match(n)
                  and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} for a {cfg.arch} model")
    return tfm.Transformer(cfg), nest(items)


def _place(src: np.ndarray, dtype: np.dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """Puts one (already transposed, memory-mapped) tensor on its devices, converting only the slice
    each device holds."""
    def fetch(index):
        return np.asarray(src[index], dtype=dtype)
    return jax.make_array_from_callback(src.shape, sharding, fetch)


def _place_stacked(layers: list[np.ndarray], dtype: np.dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """Stacks one tensor of every layer [L, ...] on its devices, each device slice read layer by layer
    from the mapped files (no full host copy)."""
    shape = (len(layers),) + tuple(layers[0].shape)

    def fetch(index):
        chosen = range(len(layers))[index[0]]  # [l, ...] for this device's layers
        return np.stack([np.asarray(layers[i][index[1:]], dtype=dtype) for i in chosen])
    return jax.make_array_from_callback(shape, sharding, fetch)


def save(path: str | os.PathLike, model: tfm.Transformer, params: dict, dtype: Any = None,
         max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors (sharded above `max_shard_bytes`) that transformers loads.

    `params` in either layout; stacked layers are written per layer under their HF names.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for p, leaf in _paths(registry.unstack_layers(jax.device_get(nn.unbox(params)))):
        name, transpose = hf_name(p)
        arr = np.asarray(jax.device_get(leaf)).astype(out_dtype)
        arr = arr.T if transpose else arr
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, out_dtype.name), indent=2))
    if len(shards) == 1:
        save_safetensors(path / "model.safetensors", shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(path / fname, shard)
        for name, arr in shard.items():
            weight_map[name] = fname
            total += arr.nbytes
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---------------------------------------------------------------------------------------------
# tokenizer + chat template

class Tokenizer:
    """tokenizer.json (the `tokenizers` library) plus the chat template of tokenizer_config.json."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok
        path = Path(path)
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        if not tok_file.exists():
            raise CheckpointError(f"{tok_file}: missing tokenizer.json")
        self._tok = _Tok.from_file(str(tok_file))
        conf_file = tok_file.parent / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(conf_file.read_text()) if conf_file.exists() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take 'default'
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token")) or self.eos_token
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        pid = self.token_to_id(self.pad_token)
        return 0 if pid is None else pid

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Renders `messages` exactly as transformers' `apply_chat_template` does."""
        if self.chat_template is None:
            raise ValueError("tokenizer_config.json has no chat_template")
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        special = {k: _token_str(v) for k, v in self.config.items()
                   if k.endswith("_token") and _token_str(v) is not None}
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**special, **kwargs})
        return self.encode(text) if tokenize else text


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _jinja_env():
    """The sandboxed jinja2 environment transformers renders chat templates with."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


R1_DISTILL_CHAT_TEMPLATE = (Path(__file__).parent / "templates" / "r1_distill.jinja").read_text()

