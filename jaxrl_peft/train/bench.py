"""Train-step benchmarks on the training core's real step (`launch/bench.py train|compile`).

Both time `loop.make_step` with the GRPO policy loss (DAPO aggregation) on random tokens and
advantages, the optimizer from `train/optimizer.py` and the method's `on_step`: the step a GRPO run
jits, with one micro-batch of `batch` rows.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft import peft
from jaxrl_peft.infra.bench import device_name, peak_memory_gb, timed
from jaxrl_peft.models import transformer as tfm
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.rl import losses
from jaxrl_peft.train import loop, optimizer as optimizer_lib, state as state_lib


def method_hparams(name: str, r: int, alpha: float) -> dict[str, Any]:
    """Benchmark hyperparameters of a PEFT method at rank r (methods without a rank take none)."""
    if name in ("lora", "rslora", "loraplus", "lorafa", "dora", "pissa", "milora"):
        return {"r": r, "alpha": alpha}
    if name == "adalora":
        return {"init_r": r, "target_r": max(1, r // 4), "alpha": alpha, "total_step": 1000}
    if name in ("miss", "vera"):
        return {"r": r}
    return {}


class PolicyLossTask:
    """The GRPO loss of a batch of random sequences: all the core's step needs from a task."""

    micro_batch_size = 1
    updates_per_batch = 1

    def __init__(self, model: tfm.Transformer, method: PeftMethod):
        self.model, self.method = model, method

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, jax.Array], totals: dict[str, jax.Array]
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        variables = self.method.model_variables(frozen["base"], adapter)
        lp, ent = tfm.token_logprobs(self.model, variables, batch["tokens"], with_entropy=True)
        loss, _ = losses.policy_loss(lp, jax.lax.stop_gradient(lp), batch["advantages"], batch["loss_mask"],
                                     total_tokens=totals["tokens"])
        return loss, {"entropy": (ent * batch["loss_mask"]).sum(), "weight": batch["loss_mask"].sum()}


def _build(method: str, model: str, batch: int, seq: int, r: int, alpha: float, dtype: str, remat: bool,
           layers: int | None, scan_layers: bool, attention: str | None, abstract: bool):
    cfg = tfm.preset(model, dtype=dtype, param_dtype=dtype, remat=remat, scan_layers=scan_layers,
                     attention_impl=attention)
    cfg = cfg.replace(num_layers=layers or cfg.num_layers)
    m = peft.get(method, **method_hparams(method, r, alpha))
    init = lambda: tfm.init_params(cfg, jax.random.key(0))  # noqa: E731
    params = jax.eval_shape(init) if abstract else jax.jit(init)()
    m = m.prepare(params)
    make = lambda p: peft.init_adapter(m, jax.random.key(1), p)  # noqa: E731
    params, adapter = jax.eval_shape(make, params) if abstract else jax.jit(make)(params)
    tx, _ = optimizer_lib.make(m, adapter, optimizer_lib.config(learning_rate=1e-5), 1000)
    init_state = lambda a: state_lib.TrainState(jnp.zeros((), jnp.int32), a, tx.init(a), m.init_state(a))  # noqa: E731
    state = jax.eval_shape(init_state, adapter) if abstract else jax.jit(init_state)(adapter)
    task = PolicyLossTask(tfm.Transformer(cfg, peft=m), m)
    step = jax.jit(loop.make_step(task, m, tx), donate_argnums=(1,))
    shape = (1, batch, seq)  # [micro_batches, rows, seq]
    batch_tree = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
                  "loss_mask": jax.ShapeDtypeStruct(shape[:2] + (seq - 1,), jnp.float32),
                  "advantages": jax.ShapeDtypeStruct(shape[:2], jnp.float32)}
    totals = {"tokens": jax.ShapeDtypeStruct((), jnp.float32)}
    return cfg, m, {"base": params}, state, step, batch_tree, totals


def compile_benchmark(model: str = "r1-distill-qwen-1.5b", layers: int | None = None, method: str = "lora",
                      batch: int = 4, seq: int = 2048, r: int = 32, alpha: float = 64, dtype: str = "bfloat16",
                      remat: bool = True, scan_layers: bool = True) -> dict[str, float]:
    """Seconds to lower and compile the core's train step on abstract shapes (no weights allocated, so
    any depth compiles on CPU); with scanned layers the time does not grow with `layers`."""
    cfg, _, frozen, state, step, batch_tree, totals = _build(method, model, batch, seq, r, alpha, dtype, remat,
                                                               layers, scan_layers, None, abstract=True)
    t0 = time.perf_counter()
    step.lower(frozen, state, batch_tree, totals).compile()
    seconds = time.perf_counter() - t0
    print(f"compile {method} r={r} {model} layers={cfg.num_layers} scan={scan_layers} {dtype} "
          f"batch={batch}x{seq} remat={remat} on {device_name()}: compile_s={seconds:.2f}", flush=True)
    return {"compile_s": seconds, "layers": cfg.num_layers}


def train(method: str = "lora", model: str = "r1-distill-qwen-1.5b", batch: int = 4, seq: int = 2048,
          r: int = 32, alpha: float = 64, dtype: str = "bfloat16", remat: bool = True, iters: int = 5,
          seed: int = 0, attention: str | None = None) -> dict[str, float]:
    """Tokens/s, step time and peak memory of the core's train step (random weights, tokens, advantages)."""
    t_setup = time.perf_counter()
    cfg, m, frozen, state, step, batch_tree, totals = _build(method, model, batch, seq, r, alpha, dtype, remat,
                                                               None, True, attention, abstract=False)
    rng = np.random.default_rng(seed)
    data = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, batch_tree["tokens"].shape), jnp.int32),
            "loss_mask": jnp.ones(batch_tree["loss_mask"].shape, jnp.float32),
            "advantages": jnp.asarray(rng.normal(size=batch_tree["advantages"].shape), jnp.float32)}
    totals = {"tokens": jnp.float32(batch * (seq - 1))}
    jax.block_until_ready((frozen, state))
    print(f"train bench: model and adapter ready after {time.perf_counter() - t_setup:.0f} s; compiling the step",
          flush=True)
    t_compile = time.perf_counter()
    compiled = step.lower(frozen, state, data, totals).compile()
    compile_s = time.perf_counter() - t_compile
    print(f"train bench: step compiled in {compile_s:.0f} s", flush=True)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(frozen, holder["state"], data, totals)
        return metrics["loss"]

    times = timed(run, iters=iters, warmup=2)
    best = float(np.median(times))
    trainable = peft.trainable_count(m, holder["state"].adapter)
    result = {"tokens_per_s": batch * seq / best, "step_seconds": best, "compile_seconds": compile_s,
              "trainable_params": trainable, "peak_memory_gb": peak_memory_gb(),
              "state_bytes_per_device": state_lib.state_bytes_per_device((frozen, holder["state"]))}
    mem = "n/a" if result["peak_memory_gb"] is None else f"{result['peak_memory_gb']:.1f} GB"
    print(f"train {method} r={r} {model} {dtype} batch={batch}x{seq} remat={remat} attention={attention or 'auto'} "
          f"on {device_name()}: {result['tokens_per_s']:,.0f} tokens/s ({1e3 * best:.0f} ms/step), peak memory {mem}, "
          f"trainable {trainable:,}")
    return result
