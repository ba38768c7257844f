"""Full fine-tuning trains every parameter of both families: every leaf gets an adapter copy, sharding
axes, and a nonzero gradient (RWKV-7's token-shift mixes, decay vectors, norm biases, embedding included)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft import peft
from jaxrl_peft.models import family, transformer as tfm
from jaxrl_peft.peft import registry
from rwkv_jax import model as rwkv_model


def _paths(tree) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _rwkv():
    cfg = rwkv_model.RWKV7Config(vocab_size=64, n_embd=64, n_layer=2, head_size=32, dim_ffn=128, decay_lora=8,
                                 iclr_lora=8, value_lora=8, gate_lora=8)
    module = rwkv_model.RWKV7(cfg)
    params = jax.tree.map(np.asarray, nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
                                                          ["params"]))
    # Official inits hold exact zeros (w1, output, ...) that block gradients: move every weight off them.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(x + 0.2 * rng.standard_normal(x.shape), jnp.float32), params)
    return rwkv_model.RWKV7Family(module), params


def _decoder():
    cfg = tfm.preset("tiny", dtype="float32")
    return family.DecoderFamily(tfm.Transformer(cfg)), tfm.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("make", [_rwkv, _decoder], ids=["rwkv7", "decoder"])
def test_every_parameter_leaf_trains(make):
    fam, params = make()
    method = peft.get("full").prepare(params)
    params, adapter = registry.init_adapter(method, jax.random.key(1), params)
    assert _paths(adapter) == _paths(params)  # a copy of every leaf, nested like the params
    axes = registry.adapter_axes(method, fam.param_axes(), adapter)
    assert jax.tree.structure(jax.tree.map(lambda x: 0, axes, is_leaf=lambda x: isinstance(x, tuple))) == \
        jax.tree.structure(adapter)
    trained = fam.with_peft(method)
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, 12)), jnp.int32)

    def loss(a):
        lp, ent = trained.token_logprobs(method.model_variables(params, a), tokens, with_entropy=True)
        return -lp.mean() + 0.1 * ent.mean()

    grads = jax.jit(jax.grad(loss))(adapter)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
    print(f"{fam.name}: {len(flat)} parameter leaves, {len(zero)} with a zero gradient")
    assert not zero, f"leaves with a zero gradient: {zero}"
