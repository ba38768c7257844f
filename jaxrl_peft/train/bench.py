"""Train-step benchmarks on the training core's real step (`launch/bench.py train|compile`).

Both time `loop.make_step` with the GRPO policy loss (DAPO aggregation) on random tokens and
advantages, the optimizer from `train/optimizer.py` and the method's `on_step`: the step a GRPO run
jits, with one micro-batch of `batch` rows. The model is a decoder preset, or for `compile` any family
given as (family, init) (launch/bench.py passes RWKV-7's, `rwkv_jax.model.preset_family`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft import peft
from jaxrl_peft.infra.bench import device_name, peak_memory_gb, timed
from jaxrl_peft.models import family as family_lib, transformer as tfm
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.rl import losses
from jaxrl_peft.train import loop, optimizer as optimizer_lib, state as state_lib


def method_hparams(name: str, r: int, alpha: float, targets: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Benchmark hyperparameters of a PEFT method at rank r (methods without a rank take none); `targets`
    replaces the ranked methods' default target modules (the decoder's projections)."""
    if name in ("lora", "rslora", "loraplus", "lorafa", "dora", "pissa", "milora"):
        hparams = {"r": r, "alpha": alpha}
    elif name == "adalora":
        hparams = {"init_r": r, "target_r": max(1, r // 4), "alpha": alpha, "total_step": 1000}
    elif name in ("miss", "vera"):
        hparams = {"r": r}
    else:
        return {}
    return hparams if targets is None else {**hparams, "target_modules": tuple(targets)}


class PolicyLossTask:
    """The GRPO loss of a batch of random sequences: all the core's step needs from a task."""

    micro_batch_size = 1
    updates_per_batch = 1

    def __init__(self, family: family_lib.Family, method: PeftMethod):
        self.family, self.method = family, method

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, jax.Array], totals: dict[str, jax.Array]
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        variables = self.method.model_variables(frozen["base"], adapter)
        lp, ent = self.family.token_logprobs(variables, batch["tokens"], with_entropy=True)
        loss, _ = losses.policy_loss(lp, jax.lax.stop_gradient(lp), batch["advantages"], batch["loss_mask"],
                                     total_tokens=totals["tokens"])
        return loss, {"entropy": (ent * batch["loss_mask"]).sum(), "weight": batch["loss_mask"].sum()}


def decoder_family(model: str, dtype: str, remat: bool, layers: int | None = None, scan_layers: bool = True,
                   attention: str | None = None) -> tuple[family_lib.Family, Callable[[], Any]]:
    """A decoder preset as (family, init): init() draws its random parameters."""
    cfg = tfm.preset(model, dtype=dtype, param_dtype=dtype, remat=remat, scan_layers=scan_layers,
                     attention_impl=attention)
    cfg = cfg.replace(num_layers=layers or cfg.num_layers)
    return family_lib.DecoderFamily(tfm.Transformer(cfg)), lambda: tfm.init_params(cfg, jax.random.key(0))


def _build(method: str, fam: family_lib.Family, init: Callable[[], Any], batch: int, seq: int, r: int,
           alpha: float, abstract: bool, targets: tuple[str, ...] | None = None):
    m = peft.get(method, **method_hparams(method, r, alpha, targets))
    params = jax.eval_shape(init) if abstract else jax.jit(init)()
    m = m.prepare(params)
    make = lambda p: peft.init_adapter(m, jax.random.key(1), p)  # noqa: E731
    params, adapter = jax.eval_shape(make, params) if abstract else jax.jit(make)(params)
    tx, _ = optimizer_lib.make(m, adapter, optimizer_lib.config(learning_rate=1e-5), 1000)
    init_state = lambda a: state_lib.TrainState(jnp.zeros((), jnp.int32), a, tx.init(a), m.init_state(a))  # noqa: E731
    state = jax.eval_shape(init_state, adapter) if abstract else jax.jit(init_state)(adapter)
    task = PolicyLossTask(fam.with_peft(m), m)
    step = jax.jit(loop.make_step(task, m, tx), donate_argnums=(1,))
    shape = (1, batch, seq)  # [micro_batches, rows, seq]
    batch_tree = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
                  "loss_mask": jax.ShapeDtypeStruct(shape[:2] + (seq - 1,), jnp.float32),
                  "advantages": jax.ShapeDtypeStruct(shape[:2], jnp.float32)}
    totals = {"tokens": jax.ShapeDtypeStruct((), jnp.float32)}
    return m, {"base": params}, state, step, batch_tree, totals


def compile_benchmark(model: str = "r1-distill-qwen-1.5b", layers: int | None = None, method: str = "lora",
                      batch: int = 4, seq: int = 2048, r: int = 32, alpha: float = 64, dtype: str = "bfloat16",
                      remat: bool = True, scan_layers: bool = True,
                      model_family: tuple[family_lib.Family, Callable[[], Any]] | None = None,
                      targets: tuple[str, ...] | None = None) -> dict[str, float]:
    """Seconds to lower and compile the core's train step on abstract shapes (no weights allocated, so
    any depth compiles on CPU); with scanned layers the time does not grow with `layers`.

    `model_family`: (family, init) of a model built by the caller (already with `layers`, `dtype`,
    `remat`, `scan_layers`; `model` is then only its label), in place of the decoder preset `model`;
    `targets`: its modules for the ranked methods (see `method_hparams`)."""
    fam, init = model_family or decoder_family(model, dtype, remat, layers, scan_layers)
    _, frozen, state, step, batch_tree, totals = _build(method, fam, init, batch, seq, r, alpha, abstract=True,
                                                        targets=targets)
    depth = registry.num_layers(frozen["base"])
    t0 = time.perf_counter()
    step.lower(frozen, state, batch_tree, totals).compile()
    seconds = time.perf_counter() - t0
    print(f"compile {method} r={r} {model} layers={depth} scan={scan_layers} {dtype} "
          f"batch={batch}x{seq} remat={remat} on {device_name()}: compile_s={seconds:.2f}", flush=True)
    return {"compile_s": seconds, "layers": depth}


def train(method: str = "lora", model: str = "r1-distill-qwen-1.5b", batch: int = 4, seq: int = 2048,
          r: int = 32, alpha: float = 64, dtype: str = "bfloat16", remat: bool = True, iters: int = 5,
          seed: int = 0, attention: str | None = None) -> dict[str, float]:
    """Tokens/s, step time and peak memory of the core's train step (random weights, tokens, advantages)."""
    t_setup = time.perf_counter()
    fam, init = decoder_family(model, dtype, remat, attention=attention)
    m, frozen, state, step, batch_tree, totals = _build(method, fam, init, batch, seq, r, alpha, abstract=False)
    cfg = fam.config
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
