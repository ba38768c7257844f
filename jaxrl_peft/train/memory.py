"""Abstract build of a training config: parameter counts, a per-chip device-memory estimate, and the
state bytes per device that the run's shardings give (the figure a live run prints at start).

Nothing is allocated: shapes come from `jax.eval_shape`, so the paper-scale configs work on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_peft import peft
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import hf, hub, transformer as tfm
from jaxrl_peft.peft import registry
from jaxrl_peft.train import optimizer as optimizer_lib, state as state_lib

GB = 1e9


def model_config(c: ml_collections.ConfigDict) -> tfm.TransformerConfig:
    """The decoder config of a run: config.json of the checkpoint (a local directory, or a hub id whose
    config is cached or can be fetched alone: a dry run never downloads weights), else the named preset."""
    resolved = hub.resolve_config_only(c.model.checkpoint, c.model.get("revision") or None)
    conf = None if resolved is None else Path(resolved.path) / "config.json"
    if conf is not None and conf.exists():
        cfg = hf.config_from_hf(json.loads(conf.read_text()), str(conf))
    else:
        cfg = tfm.preset(c.model.preset)
    return cfg.replace(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)


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
    method = registry.from_config(c.peft).prepare(abstract)
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


def state_bytes_per_device(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> int:
    """The largest number of bytes that any device holds of frozen weights + adapter + optimizer +
    method state, from the shard shapes of the shardings a run of `c` uses (no array is made)."""
    mesh = mesh or mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    cfg = model_config(c)
    param_axes = tfm.param_axes(cfg)
    method = registry.from_config(c.peft).prepare(nn.unbox(tfm.abstract_params(cfg)))
    kl = "rl" in c and c.rl.kl_coef > 0  # GRPO keeps the reference policy's weights for its KL term
    keep_initial = kl and method.residual

    def build():
        params, adapter = peft.init_adapter(method, jax.random.key(0), tfm.init_params(cfg, jax.random.key(0)))
        if not kl:
            params = registry.drop_replaced(method, params, adapter)
        tx, _ = optimizer_lib.make(method, adapter, c.optim, c.steps)
        state = state_lib.TrainState(jnp.zeros((), jnp.int32), adapter, tx.init(adapter), method.init_state(adapter))
        return params, state

    params, state = jax.eval_shape(build)
    tx, _ = optimizer_lib.make(method, state.adapter, c.optim, c.steps)
    sh = state_lib.shardings(method, tx, params, param_axes, state, mesh, keep_initial)
    trees, shardings = [params, state], [sh.frozen["base"], sh.train]
    if keep_initial:
        trees.append(state.adapter)
        shardings.append(sh.frozen["initial_adapter"])
    return state_lib.abstract_bytes_per_device(trees, shardings)
