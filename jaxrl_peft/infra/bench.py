"""Speed figures printed by `launch/bench.py`: timing helpers and the rollout benchmark."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def peak_memory_gb() -> float | None:
    """Peak device memory in GB since start, where the backend reports it (GPU/TPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def timed(fn: Callable[[], Any], iters: int = 3, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `fn()` (outputs blocked on) over `iters` runs after `warmup` runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def rollout(model: str = "r1-distill-qwen-1.5b", batch: int = 256, prompt_len: int = 256,
            new_tokens: int = 512, dtype: str = "bfloat16", iters: int = 2, seed: int = 0,
            temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> dict[str, float]:
    """Generated tokens/s of the sampler on random weights; every row generates `new_tokens`."""
    from jaxrl_peft.models import transformer as tfm
    from jaxrl_peft.rl import rollout as rl

    cfg = tfm.preset(model, dtype=dtype, param_dtype=dtype)
    net = tfm.Transformer(cfg)
    init = jax.jit(lambda k: nn.unbox(net.init(k, jnp.zeros((1, 1), jnp.int32)))["params"])
    params = init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    mask = jnp.ones((batch, prompt_len), bool)
    sampling = rl.SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    sampler = rl.Sampler(net, sampling, pad_id=0)  # no stop tokens: every row runs to its budget
    variables = {"params": params}
    keys = iter(jax.random.split(jax.random.key(seed + 1), iters + 1))
    out = {}

    def run():
        out["r"] = sampler(variables, tokens, mask, next(keys))
        return out["r"].tokens

    t0 = time.perf_counter()
    times = timed(run, iters=iters, warmup=1)
    generated = int(jnp.sum(out["r"].lengths))
    prefill = timed(lambda: sampler._prefill(variables, tokens, mask)[1], iters=iters, warmup=0)
    best = min(times)
    result = {"generated_tokens_per_s": generated / best, "seconds": best, "generated_tokens": generated,
              "prefill_seconds": min(prefill), "first_call_seconds": time.perf_counter() - t0 - sum(times)
              - sum(prefill)}
    print(f"rollout {model} {dtype} batch={batch} prompt={prompt_len} new={new_tokens} on {device_name()}: "
          f"{result['generated_tokens_per_s']:,.0f} generated tokens/s ({best:.2f} s per batch, prefill "
          f"{result['prefill_seconds']:.3f} s, decode {1e3 * (best - result['prefill_seconds']) / new_tokens:.2f}"
          f" ms/step)")
    return result


def method_hparams(name: str, r: int, alpha: float) -> dict[str, Any]:
    """Benchmark hyperparameters of a PEFT method at rank r (methods without a rank take none)."""
    if name in ("lora", "rslora", "loraplus", "lorafa", "dora", "pissa", "milora"):
        return {"r": r, "alpha": alpha}
    if name == "adalora":
        return {"init_r": r, "target_r": max(1, r // 4), "alpha": alpha, "total_step": 1000}
    if name in ("miss", "vera"):
        return {"r": r}
    return {}


def train(method: str = "lora", model: str = "r1-distill-qwen-1.5b", batch: int = 4, seq: int = 2048,
          r: int = 32, alpha: float = 64, dtype: str = "bfloat16", remat: bool = True, iters: int = 5,
          seed: int = 0, attention: str | None = None) -> dict[str, float]:
    """Training-step speed: cross-entropy on random tokens, AdamW on the adapter only."""
    import optax

    from jaxrl_peft import peft
    from jaxrl_peft.models import transformer as tfm
    from jaxrl_peft.peft import optim

    t_setup = time.perf_counter()
    cfg = tfm.preset(model, dtype=dtype, param_dtype=dtype, remat=remat, attention_impl=attention)
    m = peft.get(method, **method_hparams(method, r, alpha))
    base = tfm.Transformer(cfg)
    params = jax.jit(lambda k: nn.unbox(base.init(k, jnp.zeros((1, 1), jnp.int32)))["params"])(
        jax.random.key(seed))
    m = m.prepare(params)
    params, adapter = jax.jit(lambda p: peft.init_adapter(m, jax.random.key(seed + 1), p))(params)
    tx = optim.make_optimizer(m, adapter, 1e-5)
    opt_state = jax.jit(tx.init)(adapter)
    net = tfm.Transformer(cfg, peft=m)

    def loss_fn(adapter, params, tokens):
        lp, _ = tfm.token_logprobs(net, {"params": params, "adapter": adapter}, tokens)
        return -jnp.mean(lp)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapter, opt_state, params, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(adapter, params, tokens)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    tokens = jax.random.randint(jax.random.key(seed + 2), (batch, seq), 0, cfg.vocab_size)
    state = {"adapter": adapter, "opt": opt_state}
    jax.block_until_ready(state)
    print(f"train bench: model and adapter ready after {time.perf_counter() - t_setup:.0f} s; compiling the step",
          flush=True)
    t_compile = time.perf_counter()
    step = step.lower(state["adapter"], state["opt"], params, tokens).compile()
    print(f"train bench: step compiled in {time.perf_counter() - t_compile:.0f} s", flush=True)

    def run():
        state["adapter"], state["opt"], loss = step(state["adapter"], state["opt"], params, tokens)
        return loss

    times = timed(run, iters=iters, warmup=2)
    best = float(np.median(times))
    trainable = peft.trainable_count(m, state["adapter"])
    result = {"tokens_per_s": batch * seq / best, "step_seconds": best, "trainable_params": trainable,
              "peak_memory_gb": peak_memory_gb()}
    mem = "n/a" if result["peak_memory_gb"] is None else f"{result['peak_memory_gb']:.1f} GB"
    print(f"train {method} r={r} {model} {dtype} batch={batch}x{seq} remat={remat} attention={attention or 'auto'} "
          f"on {device_name()}: "
          f"{result['tokens_per_s']:,.0f} tokens/s ({1e3 * best:.0f} ms/step), peak memory {mem}, "
          f"trainable {trainable:,}")
    return result


def compile_benchmark(model: str = "r1-distill-qwen-1.5b", layers: int | None = None, method: str = "lora",
                      batch: int = 4, seq: int = 2048, r: int = 32, alpha: float = 64, dtype: str = "bfloat16",
                      remat: bool = True, scan_layers: bool = True) -> dict[str, float]:
    """Seconds to lower and compile every jitted function of one GRPO train step on abstract shapes.

    The gradient of the policy loss through `token_logprobs` (as rl/learner.py computes it) and the
    optimizer update with the method's `on_step`; weights are jax.ShapeDtypeStructs, so nothing is
    allocated and any depth compiles on CPU. With scanned layers the time does not grow with `layers`.
    """
    import optax

    from jaxrl_peft import peft
    from jaxrl_peft.models import transformer as tfm
    from jaxrl_peft.peft import optim
    from jaxrl_peft.rl import losses

    cfg = tfm.preset(model, dtype=dtype, param_dtype=dtype, remat=remat, scan_layers=scan_layers)
    cfg = cfg.replace(num_layers=layers or cfg.num_layers)
    base = tfm.Transformer(cfg)
    params = nn.unbox(jax.eval_shape(base.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    m = peft.get(method, **method_hparams(method, r, alpha)).prepare(params)
    params, adapter = jax.eval_shape(lambda p: peft.init_adapter(m, jax.random.key(1), p), params)
    tx = optim.make_optimizer(m, adapter, 1e-5)
    opt_state = jax.eval_shape(tx.init, adapter)
    method_state = jax.eval_shape(m.init_state, adapter)
    net = tfm.Transformer(cfg, peft=m)

    def grad_fn(adapter, params, tokens, loss_mask, old_logp, advantages):
        def loss_fn(adapter):
            lp, _ = tfm.token_logprobs(net, {"params": params, "adapter": adapter}, tokens, with_entropy=True)
            loss, _ = losses.policy_loss(lp, old_logp, advantages, loss_mask)
            return loss + m.regularizer(adapter)
        return jax.value_and_grad(loss_fn)(adapter)

    def apply_fn(adapter, opt_state, method_state, grads, step):
        updates, opt_state = tx.update(grads, opt_state, adapter)
        adapter, method_state = m.on_step(step, grads, optax.apply_updates(adapter, updates), method_state)
        return adapter, opt_state, method_state

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    per_token = jax.ShapeDtypeStruct((batch, seq - 1), jnp.float32)
    advantages = jax.ShapeDtypeStruct((batch,), jnp.float32)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    t0 = time.perf_counter()
    jax.jit(grad_fn).lower(adapter, params, tokens, per_token, per_token, advantages).compile()
    jax.jit(apply_fn, donate_argnums=(0, 1, 2)).lower(adapter, opt_state, method_state, adapter, step).compile()
    seconds = time.perf_counter() - t0
    print(f"compile {method} r={r} {model} layers={cfg.num_layers} scan={scan_layers} {dtype} "
          f"batch={batch}x{seq} remat={remat} on {device_name()}: compile_s={seconds:.2f}", flush=True)
    return {"compile_s": seconds, "layers": cfg.num_layers}
