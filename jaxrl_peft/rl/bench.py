"""The rollout benchmark: generated tokens/s of the sampler on random weights (`launch/bench.py rollout`)."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_peft.infra.bench import device_name, timed
from jaxrl_peft.models import transformer as tfm
from jaxrl_peft.rl import rollout as rl


def rollout(model: str = "r1-distill-qwen-1.5b", batch: int = 256, prompt_len: int = 256,
            new_tokens: int = 512, dtype: str = "bfloat16", iters: int = 2, seed: int = 0,
            temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> dict[str, float]:
    """Generated tokens/s of the sampler on random weights; every row generates `new_tokens`."""
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
    prefill = timed(lambda: sampler._prefill(variables, tokens, mask, None, None)[1], iters=iters, warmup=0)
    best = min(times)
    result = {"generated_tokens_per_s": generated / best, "seconds": best, "generated_tokens": generated,
              "prefill_seconds": min(prefill), "first_call_seconds": time.perf_counter() - t0 - sum(times)
              - sum(prefill)}
    print(f"rollout {model} {dtype} batch={batch} prompt={prompt_len} new={new_tokens} on {device_name()}: "
          f"{result['generated_tokens_per_s']:,.0f} generated tokens/s ({best:.2f} s per batch, prefill "
          f"{result['prefill_seconds']:.3f} s, decode {1e3 * (best - result['prefill_seconds']) / new_tokens:.2f}"
          f" ms/step)")
    return result
