"""Abstract build of a training config: parameter counts and a per-chip device-memory estimate.

Nothing is allocated: shapes come from `jax.eval_shape`, so the paper-scale configs work on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_peft import peft
from jaxrl_peft.models import transformer as tfm

GB = 1e9


def model_config(c: ml_collections.ConfigDict) -> tfm.TransformerConfig:
    """The decoder config of a run: config.json of a local checkpoint, else the named preset."""
    from jaxrl_peft.models import hf

    conf = Path(c.model.checkpoint) / "config.json"
    if conf.exists():
        cfg = hf.config_from_hf(json.loads(conf.read_text()), str(conf))
    else:
        cfg = tfm.preset(c.model.preset)
    return cfg.replace(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)


def peft_method(c: ml_collections.ConfigDict) -> peft.PeftMethod:
    hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in c.peft.hparams.items()}
    return peft.get(c.peft.name, **hparams)


@dataclasses.dataclass
class Estimate:
    trainable_params: int
    total_params: int
    chips: int
    gb: dict[str, float]

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.gb.items())
        return [f"trainable_params={self.trainable_params} total_params={self.total_params}",
                f"device memory per chip (estimate, {self.chips} chips): {sum(self.gb.values()):.2f} GB = {parts}"]


def _nbytes(tree: Any, labels: Any = None, skip_frozen: bool = False) -> float:
    leaves = jax.tree.leaves(tree)
    labs = jax.tree.leaves(labels) if labels is not None else [None] * len(leaves)
    return float(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                     for x, lab in zip(leaves, labs) if not (skip_frozen and lab == "frozen")))


def estimate(c: ml_collections.ConfigDict, chips: int | None = None) -> Estimate:
    """Counts and memory of the run `c` on `chips` devices (default: the devices of this host)."""
    cfg = model_config(c)
    chips = chips or jax.device_count()
    abstract = jax.eval_shape(lambda: tfm.init_params(cfg, jax.random.key(0)))
    method = peft_method(c).prepare(abstract)
    new_params, adapter = jax.eval_shape(lambda p: peft.init_adapter(method, jax.random.key(0), p), abstract)
    labels = peft.labels(method, adapter)
    trainable = peft.trainable_count(method, adapter)
    total = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))
    shards = chips  # parameters are sharded over fsdp x tensor; with data > 1 they are replicated
    data = c.mesh.data if c.mesh.data > 0 else 1
    param_shards = max(1, shards // data)
    rl = c.rl
    seqs = rl.prompts_per_step * rl.group_size
    seq_len = rl.max_prompt_tokens + rl.max_new_tokens
    act_bytes = jnp.dtype(cfg.dtype).itemsize
    kv = seqs * seq_len * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * act_bytes / chips
    micro = min(rl.micro_batch_size, seqs)
    tokens = micro * seq_len / min(chips, micro)  # the micro-batch is split over every device
    per_layer = tokens * cfg.hidden_size * act_bytes  # layer inputs kept under remat
    live_layer = tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * act_bytes
    activations = (cfg.num_layers * per_layer if cfg.remat else cfg.num_layers * live_layer) + live_layer
    gb = {
        "base params": _nbytes(new_params) / param_shards / GB,
        "adapter": _nbytes(adapter) / param_shards / GB,
        "grads+adam": 3 * _nbytes(adapter, labels, skip_frozen=True) / param_shards / GB,
        "rollout kv cache": kv / GB,
        "activations": activations / GB,
    }
    return Estimate(trainable, total, chips, gb)
