"""Hugging Face PEFT adapters (adapter_config.json + adapter_model.safetensors) <-> adapter trees.

Generic over methods through their hooks: `hf_config()` (the method's config fields, None when PEFT has
no format for it), `hf_tensors(module_adapter)` (suffix -> torch-layout tensor),
`from_hf_tensors(tensors, weight)`, optionally `hf_shared_tensors(adapter_tree)` (model-level tensors such
as VeRA's projections, handed back to `from_hf_tensors` under their last name part), and the classmethod
`from_hf_config(config, **kwargs)` of the class that `peft_type` (and for LORA its flags) selects.
Tensor names are PEFT's: `base_model.model.<HF module name>.<suffix>`, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Stacked (scanned) layers are
exported and imported per layer under these same names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrl_peft.models import hf, safetensors_io
from jaxrl_peft.models import transformer as tfm
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def module_name(path: tuple[str, ...]) -> str:
    """HF module name of a module path: ('layers_0', 'self_attn', 'q_proj') -> 'model.layers.0.self_attn.q_proj'.

    Linear, norm and embedding modules alike (every one's tensor is '<module>.weight').
    """
    return hf.hf_name(tuple(path) + ("kernel",))[0][: -len(".weight")]


def _adapted(params: dict, adapter: dict) -> list[tuple[tuple[str, ...], str, dict, dict]]:
    """(path, kind, module params, module adapter) of every module that has adapter leaves."""
    found = registry.map_modules(lambda p, k, m, a: (p, k, m, a), params, adapter)
    return [(p, k, m, a) for p, k, m, a in found if a]


def _target_modules(params: dict, paths: list[tuple[str, ...]]) -> list[str] | str:
    """PEFT `target_modules`: module names when they select exactly `paths`, else a full-name regex."""
    chosen = set(paths)
    names = sorted({p[-1] for p in chosen})
    same_name = {p for p, _, _ in registry.modules(params) if p[-1] in names}
    if same_name == chosen:
        return names
    return "^(" + "|".join(re.escape(module_name(p)) for p in sorted(chosen)) + ")$"


def to_hf_state_dict(method: PeftMethod, params: dict, adapter: dict) -> dict[str, np.ndarray]:
    """The adapter as PEFT's saved state dict (names as in adapter_model.safetensors, torch layout)."""
    out = {}
    for path, _, _, a in _adapted(params, adapter):
        for suffix, t in method.hf_tensors(a).items():
            out[f"{PREFIX}{module_name(path)}.{suffix}"] = np.ascontiguousarray(np.asarray(jax.device_get(t)))
    shared = method.hf_shared_tensors(registry.unstack_layers(adapter))  # model-level, e.g. VeRA's projections
    out.update({k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in shared.items()})
    return out


def save_adapter(path: str | os.PathLike, method: PeftMethod, params: dict, adapter: dict,
                 base_model_name_or_path: str = "") -> None:
    """Writes `path`/adapter_config.json and adapter_model.safetensors as HF PEFT's save_pretrained.

    `params` are the params the adapter trains against (for PiSSA/MiLoRA the residual ones); the
    exported adapter is relative to the original base model.
    """
    cfg = method.hf_config()
    if cfg is None:
        raise ValueError(f"PEFT method {method.name!r} has no Hugging Face PEFT format; export merged weights "
                         "with save_merged instead")
    adapted = _adapted(params, adapter)
    if not adapted:
        raise ValueError(f"PEFT method {method.name!r}: the adapter tree holds no adapter for any module of params")
    cfg = {**cfg, "target_modules": _target_modules(params, [p for p, _, _, _ in adapted]),
           "base_model_name_or_path": base_model_name_or_path or None, "task_type": "CAUSAL_LM",
           "inference_mode": True, "revision": None}
    tensors = to_hf_state_dict(method, params, adapter)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    safetensors_io.save_safetensors(path / WEIGHTS_NAME, tensors, metadata={"format": "pt"})


def _match_targets(cfg: dict, params: dict, source: str) -> tuple[str, ...]:
    """Our target patterns for the modules PEFT's `target_modules` / `exclude_modules` select."""
    targets, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    mods = [(p, module_name(p)) for p, _, _ in registry.modules(params)]

    def select(spec: Any) -> set[tuple[str, ...]]:
        if spec is None:
            return set()
        if spec == "all-linear":
            return {p for p, k, _ in registry.modules(params) if k == "linear" and p[-1] != "lm_head"}
        if isinstance(spec, str):
            return {p for p, n in mods if re.fullmatch(spec, n)}
        return {p for p, n in mods if any(n == t or n.endswith("." + t) for t in spec)}

    if targets is None:
        raise ValueError(f"{source}: target_modules is missing")
    chosen = sorted(select(targets) - select(exclude))
    if not chosen:
        raise ValueError(f"{source}: target_modules {targets!r} matches no module of the model")
    names = {p[-1] for p in chosen}
    if {p for p, _ in mods if p[-1] in names} == set(chosen):
        return tuple(sorted(names))
    return tuple("/".join(p) for p in chosen)


_PEFT_TYPES = {"ADALORA": "adalora", "VERA": "vera", "IA3": "ia3", "MISS": "miss", "LN_TUNING": "ln_tuning"}


def method_name_for(cfg: dict, source: str = CONFIG_NAME) -> str:
    """Which registered method reads this HF PEFT config."""
    peft_type = cfg.get("peft_type")
    if peft_type == "LORA":
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith("pissa"):
            return "pissa"
        if init not in (True, False, "gaussian"):
            raise ValueError(f"{source}: LoRA init_lora_weights={init!r} is not supported")
        if cfg.get("use_dora"):
            return "dora"
        return "rslora" if cfg.get("use_rslora") else "lora"
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"{source}: peft_type {peft_type!r} is not supported; known: "
                         f"{['LORA', *_PEFT_TYPES]}")
    return _PEFT_TYPES[peft_type]


def method_from_hf_config(cfg: dict, target_modules: tuple[str, ...], source: str = CONFIG_NAME) -> PeftMethod:
    """The method an HF PEFT config describes, through its class's `from_hf_config` classmethod."""
    name = method_name_for(cfg, source)
    if name not in registry.methods():
        raise ValueError(f"{source}: method {name!r} is not registered")
    cls = registry._METHODS[name]
    try:
        return cls.from_hf_config(cfg, target_modules=target_modules)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{source}: {e}") from e


def load_adapter(path: str | os.PathLike, model_cfg: tfm.TransformerConfig, params: dict
                 ) -> tuple[PeftMethod, dict, dict]:
    """Reads an HF PEFT adapter directory for the model `params` (the original base weights).

    Returns (method, params', adapter); params' differs from params only for residual methods
    (an unconverted PEFT PiSSA adapter: the SVD is recomputed, as PEFT does on load).
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.exists():
        raise hf.CheckpointError(f"{path}: missing {CONFIG_NAME}")
    if not weights.exists():
        raise hf.CheckpointError(f"{path}: missing {WEIGHTS_NAME} (only safetensors adapters are read)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise hf.CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    layers = registry.num_layers(params)
    if layers != model_cfg.num_layers:
        raise ValueError(f"params hold {layers} layers but the model config says {model_cfg.num_layers}")
    method = method_from_hf_config(cfg, _match_targets(cfg, params, str(cfg_file)), str(cfg_file)).prepare(params)
    new_params, init = registry.init_adapter(method, jax.random.key(0), params)
    st = safetensors_io.SafetensorsFile(weights)
    names = set(st.keys())
    # Model-level tensors (e.g. 'base_model.vera_A') are handed to every module under their last name part.
    shared = {k.rsplit(".", 1)[-1]: st.get(k) for k in names if k.count(".") == 1}
    names -= {k for k in names if k.count(".") == 1}
    adapter: dict = {}
    for mod_path, _, mod, a0 in _adapted(new_params, init):
        prefix = f"{PREFIX}{module_name(mod_path)}."
        mine = {k[len(prefix):]: st.get(k) for k in names if k.startswith(prefix)}
        if not mine:
            raise hf.CheckpointError(f"{weights}: no tensors for module {prefix[:-1]!r}")
        names -= {prefix + k for k in mine}
        try:
            weight = next(mod[k] for k in ("kernel", "scale", "embedding") if k in mod)
            a = {**a0, **method.from_hf_tensors({**mine, **shared}, weight)}
        except (KeyError, ValueError) as e:
            raise hf.CheckpointError(f"{weights}: module {prefix[:-1]!r}: {e}") from e
        node = adapter
        for p in mod_path:
            node = node.setdefault(p, {})
        node.update(a)
    if names:
        raise hf.CheckpointError(f"{weights}: tensors for modules that {CONFIG_NAME} does not target: "
                                 f"{sorted(names)[:5]}")
    if registry.is_stacked(new_params):
        adapter = registry.stack_layers(adapter, model_cfg.num_layers)
    return method, new_params, adapter


def save_merged(path: str | os.PathLike, model: tfm.Transformer, method: PeftMethod, params: dict,
                adapter: dict, dtype: Any = None) -> None:
    """A full HF checkpoint (config.json + safetensors) with the adapter folded into the weights.

    `params` are the params the adapter trains against (residual ones for PiSSA/MiLoRA).
    """
    hf.save(path, model, registry.merge(method, params, adapter), dtype=dtype)
