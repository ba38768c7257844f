"""Shared helpers for parity tests of PEFT methods against Hugging Face PEFT (torch, CPU, fp32).

A tiny random Qwen2 is saved once and loaded both by transformers and by `hf.load`, so the base weights are
bit-identical. Adapter weights travel between the two sides in PEFT's saved-state-dict naming
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), through the method's `hf_tensors` hook
or a custom per-module mapping `to_hf(module_adapter) -> {suffix: torch-layout array}`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft_lib = pytest.importorskip("peft")

from jaxrl_peft.models import hf, transformer as tfm  # noqa: E402
from jaxrl_peft.models import hf_peft
from jaxrl_peft.peft import registry  # noqa: E402
from jaxrl_peft.peft.base import PeftMethod  # noqa: E402

VOCAB = 128
TINY_QWEN2 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
ToHF = Callable[[dict], dict]


@dataclasses.dataclass
class Base:
    """One tiny random Qwen2 saved in HF format, and the same weights as our (model, params)."""

    path: Path
    model: tfm.Transformer
    params: dict

    @property
    def cfg(self) -> tfm.TransformerConfig:
        return self.model.cfg

    def hf_model(self):
        """A fresh transformers copy of the base model (fp32, eval mode)."""
        return transformers.AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()


def make_hf_qwen2(seed: int = 0, **overrides: Any):
    """A tiny Qwen2ForCausalLM with every tensor random (norm gains and biases too)."""
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TINY_QWEN2, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base, scale = (1.0, 0.5) if "norm" in name else (0.0, 0.08)
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return model.eval()


def make_base(path: Path, seed: int = 0, **overrides: Any) -> Base:
    """Saves a tiny random Qwen2 to `path` and loads it with hf.load (fp32)."""
    make_hf_qwen2(seed, **overrides).save_pretrained(path)
    model, params = hf.load(path, dtype=jnp.float32)
    return Base(Path(path), model, params)


def peft_model(base: Base, config: Any):
    """HF PEFT's get_peft_model on a fresh copy of the base (eval mode: dropout off)."""
    return hf_peft_lib.get_peft_model(base.hf_model(), config).eval()


def randomize(adapter: dict, seed: int = 0, scale: float = 0.1, skip: tuple[str, ...] = ()) -> dict:
    """Every adapter leaf plus scale * N(0, 1) noise, so no parity check can pass on a no-op adapter.

    Leaves whose name is in `skip` (e.g. frozen initial factors) are kept as they are.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapter)
    rng = np.random.RandomState(seed)
    out = []
    for kp, leaf in flat:
        if kp[-1].key in skip:
            out.append(leaf)
        else:
            out.append(leaf + jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def to_hf_state(method: PeftMethod, params: dict, tree: dict, to_hf: ToHF | None = None) -> dict[str, np.ndarray]:
    """An adapter-shaped tree (weights or gradients) in PEFT's saved naming and torch layout."""
    if to_hf is None:
        return hf_peft.to_hf_state_dict(method, params, tree)
    out = {}
    for path, _, _, a in registry.map_modules(lambda p, k, m, a: (p, k, m, a), params, tree):
        if a:
            for suffix, t in to_hf(a).items():
                out[f"{hf_peft.PREFIX}{hf_peft.module_name(path)}.{suffix}"] = np.asarray(t)
    return out


def load_into_hf(pm, state: dict[str, np.ndarray]) -> None:
    """Sets the adapter of PEFT model `pm` from a saved-format state dict; every tensor must land."""
    tensors = {k: torch.tensor(np.array(v, dtype=np.float32)) for k, v in state.items()}
    result = hf_peft_lib.set_peft_model_state_dict(pm, tensors)
    assert not result.unexpected_keys, result.unexpected_keys
    landed = hf_peft_lib.get_peft_model_state_dict(pm)
    for k, v in tensors.items():
        assert k in landed, f"{k} is not an adapter tensor of the PEFT model"
        assert torch.equal(landed[k].float(), v), f"{k} did not load"


def hf_state_to_np(state: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in state.items()}


def inputs(seed: int = 0, batch: int = 2, length: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, T] and fixed random loss weights [B, T, V]: loss = sum(logits * weights)."""
    rng = np.random.RandomState(seed)
    return (rng.randint(0, VOCAB, (batch, length)),
            rng.standard_normal((batch, length, VOCAB)).astype(np.float32) / (batch * length))


def our_logits_and_grads(method: PeftMethod, base: Base, params: dict, adapter: dict, tokens: np.ndarray,
                         weights: np.ndarray) -> tuple[np.ndarray, dict]:
    """Our logits and the gradient of sum(logits * weights) with respect to the adapter."""
    model = tfm.Transformer(base.cfg, peft=method)

    def loss(a):
        logits = model.apply({"params": params, "adapter": a}, jnp.asarray(tokens))
        return jnp.sum(logits * weights), logits

    # Eager on purpose: each primitive compiles once per shape and is reused by every later test, which on
    # CPU is far cheaper than one XLA compilation of the whole model per method.
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(adapter)
    return np.asarray(logits), grads


def our_logits(method: PeftMethod | None, base: Base, params: dict, adapter: dict | None,
               tokens: np.ndarray) -> np.ndarray:
    model = tfm.Transformer(base.cfg, peft=method)
    variables = {"params": params, **({"adapter": adapter} if adapter else {})}
    return np.asarray(model.apply(variables, jnp.asarray(tokens)))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def hf_logits_and_grads(pm, tokens: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """PEFT's logits and the gradient of sum(logits * weights), in saved naming (no grad -> zeros)."""
    pm.zero_grad(set_to_none=True)
    logits = pm(torch.tensor(tokens)).logits
    (logits * torch.tensor(weights)).sum().backward()
    state = pm.state_dict()
    for name, p in pm.named_parameters():
        state[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    grads = hf_peft_lib.get_peft_model_state_dict(pm, state_dict=state)
    return logits.detach().numpy(), hf_state_to_np(grads)


def max_abs_diff(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    """Largest |difference| over the tensors of `ours`, each of which must exist in `theirs`."""
    missing = sorted(set(ours) - set(theirs))
    assert not missing, f"not in the HF state: {missing[:3]}"
    return max(float(np.abs(np.asarray(v) - theirs[k]).max()) for k, v in ours.items())


def compare_with_hf(method: PeftMethod, base: Base, params: dict, adapter: dict, pm,
                    to_hf: ToHF | None = None, seed: int = 1) -> tuple[float, float]:
    """Max |diff| of logits and of adapter gradients between ours and PEFT model `pm`.

    The caller has already put the same adapter weights into `pm` (e.g. load_into_hf).
    """
    tokens, weights = inputs(seed)
    logits, grads = our_logits_and_grads(method, base, params, adapter, tokens, weights)
    ref_logits, ref_grads = hf_logits_and_grads(pm, tokens, weights)
    ours = to_hf_state(method, params, grads, to_hf)
    assert any(np.abs(v).max() > 0 for v in ours.values()), "all adapter gradients are zero"
    return float(np.abs(logits - ref_logits).max()), max_abs_diff(ours, ref_grads)
