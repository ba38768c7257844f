"""The SigLIP and CLIP vision towers (ModRWKV's image encoders), loaded from Hugging Face checkpoints
(and SigLIP towers written as ones: `save_hf`, `save_preprocessor`).

Flax linen; parameters are plain nested dicts named like the HF modules (`layers_3/self_attn/q_proj/kernel`),
so PEFT target patterns read the same as in HF PEFT. Every projection, the patch embedding included (a
Linear over unfolded patches), goes through the shared `Linear`. Fixed-resolution SigLIP2 checkpoints
are SigLIP checkpoints (model_type 'siglip'); NaFlex SigLIP2 checkpoints are rejected.

`VisionEncoder.apply({'params': p}, pixel_values [B, 3, H, W]) -> features [B, N, D]` equals transformers'
`last_hidden_state`: SigLIP after its post-layernorm, CLIP the last encoder layer with the CLS token first
(before CLIP's post_layernorm, which transformers applies only to the pooled CLS token).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models.layers import LayerNorm, Linear
from jaxrl_peft.models.safetensors_io import CheckpointError, TensorIndex, save_safetensors
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.peft.registry import nest

Array = jax.Array

# transformers' SiglipVisionConfig / CLIPVisionConfig defaults, for configs that leave fields out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}
# model_type in config.json -> tower architecture.
ARCH_OF_MODEL_TYPE = {"siglip": "siglip", "siglip_vision_model": "siglip", "siglip2": "siglip",
                      "siglip2_vision_model": "siglip", "clip": "clip", "clip_vision_model": "clip"}
_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
_PATCH_SUFFIX = "embeddings.patch_embedding.weight"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shapes and numerics of a ViT tower; field names follow HF's vision_config where they exist."""

    arch: str  # 'siglip' | 'clip'
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "xla"  # passed to jax.nn.dot_product_attention ('xla' | 'cudnn')

    def replace(self, **kw: Any) -> "VisionConfig":
        return dataclasses.replace(self, **kw)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_tokens(self) -> int:
        """Length N of the output sequence: the patches, plus CLIP's CLS token in front."""
        return self.num_patches + (1 if self.arch == "clip" else 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> VisionConfig:
    """The vision tower of an HF config dict: a full SigLIP/CLIP config or a vision-only one."""
    model_type = hf.get("model_type")
    if model_type not in ARCH_OF_MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a vision tower; "
                              f"expected one of {sorted(ARCH_OF_MODEL_TYPE)}")
    vision = hf.get("vision_config", hf) if model_type in ("siglip", "siglip2", "clip") else hf
    vision = vision or {}
    if model_type.startswith("siglip2") and ("num_patches" in vision or "image_size" not in vision):
        raise CheckpointError(f"{source}: a SigLIP2 NaFlex checkpoint (model_type {model_type!r}, variable "
                              f"resolution via num_patches={vision.get('num_patches')}) is not supported; use a "
                              "fixed-resolution SigLIP2 checkpoint such as google/siglip2-base-patch16-384, "
                              "whose config.json says model_type 'siglip'")
    arch = ARCH_OF_MODEL_TYPE[model_type]
    fields = {**_HF_DEFAULTS[arch], **{k: v for k, v in vision.items() if v is not None}}
    if fields["hidden_act"] not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: vision hidden_act {fields['hidden_act']!r} is not supported; "
                              f"known: {sorted(_ACTIVATIONS)}")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise CheckpointError(f"{source}: hidden_size {fields['hidden_size']} is not divisible by "
                              f"num_attention_heads {fields['num_attention_heads']}")
    if fields["image_size"] % fields["patch_size"]:
        raise CheckpointError(f"{source}: image_size {fields['image_size']} is not a multiple of "
                              f"patch_size {fields['patch_size']}")
    return VisionConfig(
        arch=arch, hidden_size=int(fields["hidden_size"]), intermediate_size=int(fields["intermediate_size"]),
        num_layers=int(fields["num_hidden_layers"]), num_heads=int(fields["num_attention_heads"]),
        image_size=int(fields["image_size"]), patch_size=int(fields["patch_size"]),
        num_channels=int(fields["num_channels"]), hidden_act=fields["hidden_act"],
        layer_norm_eps=float(fields["layer_norm_eps"]))


def _linear_kw(cfg: VisionConfig, peft: PeftMethod | None) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), peft=peft)


def _norm(cfg: VisionConfig, peft: PeftMethod | None, name: str) -> LayerNorm:
    return LayerNorm(eps=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                     peft=peft, name=name)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    cfg: VisionConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        lin = _linear_kw(cfg, self.peft)
        b, n, _ = x.shape
        heads = (b, n, cfg.num_heads, cfg.head_dim)
        q = Linear(cfg.hidden_size, ("embed", "heads"), True, name="q_proj", **lin)(x).reshape(heads)
        k = Linear(cfg.hidden_size, ("embed", "heads"), True, name="k_proj", **lin)(x).reshape(heads)
        v = Linear(cfg.hidden_size, ("embed", "heads"), True, name="v_proj", **lin)(x).reshape(heads)
        # q, k, v: [B, N, heads, head_dim]
        y = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(cfg.head_dim),
                                         implementation=cfg.attention_impl)
        y = y.reshape(b, n, cfg.hidden_size)
        return Linear(cfg.hidden_size, ("heads", "embed"), True, name="out_proj", **lin)(y)


class MLP(nn.Module):
    cfg: VisionConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        lin = _linear_kw(cfg, self.peft)
        h = Linear(cfg.intermediate_size, ("embed", "mlp"), True, name="fc1", **lin)(x)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return Linear(cfg.hidden_size, ("mlp", "embed"), True, name="fc2", **lin)(h)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    cfg: VisionConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x + Attention(self.cfg, self.peft, name="self_attn")(_norm(self.cfg, self.peft, "layer_norm1")(x))
        return x + MLP(self.cfg, self.peft, name="mlp")(_norm(self.cfg, self.peft, "layer_norm2")(x))


class Embeddings(nn.Module):
    """Patch embedding (a Linear over unfolded patches), CLIP's CLS token, learned positions."""

    cfg: VisionConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.cfg
        b, c, h, w = pixel_values.shape
        if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"{cfg.arch} vision tower expects pixel_values [batch, {cfg.num_channels}, "
                             f"{cfg.image_size}, {cfg.image_size}], got {tuple(pixel_values.shape)}")
        p, g = cfg.patch_size, cfg.grid
        patches = pixel_values.reshape(b, c, g, p, g, p)  # [B, C, rows, p, cols, p]
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)  # [B, patches, C*p*p]
        use_bias = cfg.arch == "siglip"
        x = Linear(cfg.hidden_size, (None, "embed"), use_bias, name="patch_embedding",
                   **_linear_kw(cfg, self.peft))(patches)  # [B, patches, D]
        pdt = jnp.dtype(cfg.param_dtype)
        if cfg.arch == "clip":
            cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                             ("embed",)), (cfg.hidden_size,), pdt)
            cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size))
            x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + patches, D]
        positions = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("length", "embed")), (cfg.num_tokens, cfg.hidden_size), pdt)
        return x + positions.astype(x.dtype)[None]


class VisionEncoder(nn.Module):
    """SigLIP / CLIP vision tower: pixel_values [B, C, H, W] -> features [B, N, D] (HF last_hidden_state)."""

    cfg: VisionConfig
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        cfg = self.cfg
        x = Embeddings(cfg, self.peft, name="embeddings")(pixel_values.astype(jnp.dtype(cfg.dtype)))
        if cfg.arch == "clip":
            x = _norm(cfg, self.peft, "pre_layrnorm")(x)
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, self.peft, name=f"layers_{i}")(x)
        if cfg.arch == "siglip":
            x = _norm(cfg, self.peft, "post_layernorm")(x)
        return x


def abstract_params(cfg: VisionConfig) -> Any:
    """The boxed (logically partitioned) parameter shapes, without allocating anything."""
    pixels = jax.ShapeDtypeStruct((1, cfg.num_channels, cfg.image_size, cfg.image_size), jnp.float32)
    return jax.eval_shape(VisionEncoder(cfg).init, jax.random.key(0), pixels)["params"]


def init_params(cfg: VisionConfig, key: Array) -> Any:
    """Random parameters, unboxed (for tests and from-scratch towers)."""
    pixels = jnp.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size), jnp.float32)
    return nn.unbox(VisionEncoder(cfg).init(key, pixels)["params"])


# ---------------------------------------------------------------------------------------------
# parameter paths <-> HF tensor names

def hf_name(path: tuple[str, ...], prefix: str) -> str:
    """HF tensor name (under the tower's `prefix`, e.g. 'vision_model.') of a parameter path."""
    *mods, leaf = path
    parts = []
    for m in mods:
        match = re.fullmatch(r"layers_(\d+)", m)
        parts.extend(["encoder", "layers", match.group(1)] if match else [m])
    if leaf in ("class_embedding", "position_embedding"):
        return prefix + ".".join(parts + [leaf] + (["weight"] if leaf == "position_embedding" else []))
    return prefix + ".".join(parts + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _to_param_layout(raw: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """An HF tensor in our layout: Linear weights [out, in] -> [in, out]; conv [D, C, p, p] -> [C*p*p, D]."""
    if path[-1] != "kernel":
        return raw
    return raw.reshape(raw.shape[0], -1).T


def vision_prefix(names: list[str], source: str) -> str:
    """The name prefix of the vision tower's tensors ('' , 'vision_model.', 'vision_tower.vision_model.', ...)."""
    found = [n[: -len(_PATCH_SUFFIX)] for n in names if n.endswith(_PATCH_SUFFIX)]
    if len(found) != 1:
        raise CheckpointError(f"{source}: expected exactly one tensor named '*{_PATCH_SUFFIX}' (the vision "
                              f"tower's patch embedding), found {found or 'none'}")
    return found[0]


def _tower_tensor(name: str, prefix: str, arch: str) -> bool:
    """Whether a checkpoint tensor belongs to the part of the tower this module implements.

    Not: SigLIP's attention-pooling head, CLIP's post_layernorm (transformers applies it to the pooled CLS
    token only), projections and the text tower.
    """
    if not name.startswith(prefix):
        return False
    norms = "pre_layrnorm" if arch == "clip" else "post_layernorm"
    return re.match(rf"(embeddings|encoder|{norms})\.", name[len(prefix):]) is not None


def load_from_config(path: str | Path, hf_config: dict[str, Any], *, dtype: Any = jnp.float32,
                     compute_dtype: Any = None, mesh: Mesh | None = None,
                     rules=mesh_lib.LOGICAL_RULES) -> tuple[VisionEncoder, dict]:
    """Loads the vision tower of an HF SigLIP/CLIP checkpoint directory whose config.json is `hf_config`.

    Full checkpoints (with the text tower) load too: only the vision tower's tensors are read. Each
    tensor is read from the mapped file, cast to `dtype` and placed on `mesh` (default: the first device).
    """
    path = Path(path)
    cfg_file = path / "config.json"
    dtype = jnp.dtype(dtype)
    cfg = config_from_hf(hf_config, str(cfg_file)).replace(
        param_dtype=dtype.name, dtype=jnp.dtype(compute_dtype or dtype).name)
    index = TensorIndex(path)
    prefix = vision_prefix(index.keys(), str(path))
    patch_name = prefix + _PATCH_SUFFIX
    if len(index.get(patch_name).shape) != 4:
        raise CheckpointError(f"{index.file_of(patch_name)}: tensor {patch_name!r} has shape "
                              f"{tuple(index.get(patch_name).shape)}; a fixed-resolution tower has a conv patch "
                              "embedding [D, C, p, p] (a 2-D one is a SigLIP2 NaFlex checkpoint, not supported)")
    abstract = abstract_params(cfg)
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                 nn.unbox(abstract))
    else:
        shardings = mesh_lib.param_shardings(abstract, mesh, rules)
    flat_shard = dict(_paths(shardings))
    used, items = set(), []
    for p, leaf in _paths(abstract):
        name = hf_name(p, prefix)
        want = tuple(leaf.value.shape)
        if name not in index:
            raise CheckpointError(f"{path}: checkpoint is missing tensor {name!r} (parameter "
                                  f"{'/'.join(p)} of shape {want})")
        raw = index.get(name)
        value = _to_param_layout(raw, p)
        if tuple(value.shape) != want:
            raise CheckpointError(f"{index.file_of(name)}: tensor {name!r} has shape {tuple(raw.shape)}, "
                                  f"which does not fit parameter {'/'.join(p)} {want} from {cfg_file.name}")
        used.add(name)
        items.append((p, jax.device_put(np.asarray(value, dtype=dtype), flat_shard[p])))
    unexpected = [n for n in index.keys() if _tower_tensor(n, prefix, cfg.arch) and n not in used]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected vision tensors {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} for the {cfg.arch} tower of "
                              f"{cfg_file.name} ({cfg.num_layers} layers)")
    return VisionEncoder(cfg), nest(items)


def _paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    return [(tuple(k.key for k in kp), v) for kp, v in flat]


# ---------------------------------------------------------------------------------------------
# Writing HF checkpoints (the inverse of the loader's mapping)

def _to_hf_layout(value: np.ndarray, path: tuple[str, ...], cfg: VisionConfig) -> np.ndarray:
    """A parameter in HF's layout: Linear kernels [in, out] -> [out, in]; the patch embedding's
    [C*p*p, D] -> conv weight [D, C, p, p]."""
    if path[-1] != "kernel":
        return value
    if path[-2] == "patch_embedding":
        p = cfg.patch_size
        return value.T.reshape(cfg.hidden_size, cfg.num_channels, p, p)
    return value.T


def hf_config(cfg: VisionConfig) -> dict[str, Any]:
    """The config.json of a vision-only SigLIP checkpoint (SiglipVisionConfig's fields, no pooling head)."""
    if cfg.arch != "siglip":
        raise ValueError(f"hf_config: only SigLIP towers are written, got arch {cfg.arch!r} (a CLIP checkpoint "
                         "would also need its post_layernorm, which this module does not hold)")
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_channels": cfg.num_channels, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps, "attention_dropout": 0.0,
            "vision_use_head": False, "dtype": "float32"}


def save_hf(path: str | Path, cfg: VisionConfig, params: Any, *, prefix: str = "vision_model.",
            dtype: Any = np.float32) -> Path:
    """Writes a SigLIP tower as an HF vision checkpoint: config.json (model_type 'siglip_vision_model',
    no attention-pooling head) and model.safetensors in HF names and layouts under `prefix` (the
    'vision_model.' of transformers 4.x, which 5.x loads too). `load_from_config` reads it back exactly."""
    path = Path(path)
    config = hf_config(cfg)
    params = jax.tree.map(np.asarray, nn.unbox(params))
    expected = {p: tuple(leaf.value.shape) for p, leaf in _paths(abstract_params(cfg))}
    given = dict(_paths(params))
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"save_hf: params do not match the tower of the config: missing "
                         f"{['/'.join(p) for p in missing[:4]]}, unexpected {['/'.join(p) for p in unexpected[:4]]}")
    tensors = {}
    for p, want in expected.items():
        if given[p].shape != want:
            raise ValueError(f"save_hf: parameter {'/'.join(p)} has shape {given[p].shape}, the config gives {want}")
        tensors[hf_name(p, prefix)] = np.ascontiguousarray(_to_hf_layout(given[p], p, cfg).astype(dtype))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_safetensors(path / "model.safetensors", dict(sorted(tensors.items())), metadata={"format": "pt"})
    return path


def save_preprocessor(path: str | Path, image_size: int, *, resample: int = 3,
                      image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                      image_std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> Path:
    """Writes the preprocessor_config.json of a SiglipImageProcessor: resize to image_size x image_size
    (PIL filter `resample`, bicubic by default), rescale by 1/255, normalize with mean/std (0.5 as SigLIP)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
              "size": {"height": int(image_size), "width": int(image_size)}, "resample": int(resample),
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": [float(x) for x in image_mean], "image_std": [float(x) for x in image_std],
              "do_convert_rgb": True}
    file = path / "preprocessor_config.json"
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return file
