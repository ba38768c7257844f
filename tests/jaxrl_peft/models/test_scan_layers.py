"""Scanned (stacked) decoder layers against the unrolled model: same logits, gradients, adapters, exports."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft import peft
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import hf, transformer as tfm
from jaxrl_peft.models import hf_peft
from jaxrl_peft.peft import optim, registry

CFG = tfm.preset("tiny", dtype="float32", vocab_size=128, num_layers=3)
TOKENS = jax.random.randint(jax.random.key(7), (2, 10), 0, 128)

# Every registered method, with hyperparameters small enough for the tiny model.
METHODS = {
    "lora": dict(r=2, alpha=4), "rslora": dict(r=2, alpha=4), "loraplus": dict(r=2, alpha=4),
    "lorafa": dict(r=2, alpha=4), "dora": dict(r=2, alpha=4), "pissa": dict(r=2, alpha=4),
    "milora": dict(r=2, alpha=4), "adalora": dict(init_r=4, target_r=2, alpha=4, total_step=10),
    "miss": dict(r=4), "vera": dict(r=4), "ia3": dict(feedforward_modules=("down_proj",)),
    "ln_tuning": {}, "full": {},
}


def _stacked_and_unrolled():
    params = tfm.init_params(CFG, jax.random.key(0))
    return params, registry.unstack_layers(params)


def _equal_trees(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _noisy(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def test_params_stack_under_one_layers_module_with_a_layer_axis():
    params, unrolled = _stacked_and_unrolled()
    assert sorted(params) == ["embed_tokens", "layers", "lm_head", "norm"]
    assert params["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 64, 128)
    specs = nn.get_partition_spec(tfm.abstract_params(CFG))
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
    assert specs["layers"]["input_layernorm"]["scale"] == jax.sharding.PartitionSpec("layers", "norm")
    assert specs["norm"]["scale"] == jax.sharding.PartitionSpec("norm")
    assert dict(mesh_lib.LOGICAL_RULES)["layers"] is None
    assert sorted(unrolled) == ["embed_tokens", "layers_0", "layers_1", "layers_2", "lm_head", "norm"]
    _equal_trees(registry.stack_layers(unrolled), params)
    # A seed gives the same numbers in both layouts; the scanned model's own init has the same shapes.
    _equal_trees(tfm.init_params(CFG.replace(scan_layers=False), jax.random.key(0)), unrolled)
    shapes = jax.tree.map(jnp.shape, nn.unbox(tfm.abstract_params(CFG)))
    assert shapes == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_scanned_and_unrolled_give_the_same_logits_and_adapter_gradients(name, remat):
    params, unrolled = _stacked_and_unrolled()
    method = peft.get(name, **METHODS[name]).prepare(params)
    _, adapter = peft.init_adapter(method, jax.random.key(1), params)
    adapter = _noisy(adapter, 2)
    cfg = CFG.replace(remat=remat)
    weights = jax.random.normal(jax.random.key(3), (2, 10, 128)) / 20

    def loss(model, p, a):
        return jnp.sum(model.apply({"params": p, "adapter": a}, TOKENS) * weights)

    scanned = tfm.Transformer(cfg, peft=method)
    looped = tfm.Transformer(cfg.replace(scan_layers=False), peft=method)
    l1, g1 = jax.value_and_grad(loss, argnums=2)(scanned, params, adapter)
    l2, g2 = jax.value_and_grad(loss, argnums=2)(looped, unrolled, registry.unstack_layers(adapter))
    np.testing.assert_allclose(scanned.apply({"params": params, "adapter": adapter}, TOKENS),
                               looped.apply({"params": unrolled, "adapter": registry.unstack_layers(adapter)},
                                            TOKENS), atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    assert float(jnp.abs(g1["layers"]["mlp"]["down_proj"][next(iter(g1["layers"]["mlp"]["down_proj"]))]).max()) > 0
    stacked_g2 = registry.stack_layers(g2)
    assert jax.tree.structure(g1) == jax.tree.structure(stacked_g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(stacked_g2)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_inits_merges_and_labels_the_same_in_both_layouts(name):
    params, unrolled = _stacked_and_unrolled()
    method = peft.get(name, **METHODS[name]).prepare(params)
    assert method == peft.get(name, **METHODS[name]).prepare(unrolled)
    new_params, adapter = peft.init_adapter(method, jax.random.key(1), params)
    new_unrolled, adapter_u = peft.init_adapter(method, jax.random.key(1), unrolled)
    assert "layers" in adapter and "layers_0" not in adapter and "layers_0" in adapter_u
    _equal_trees(new_params, registry.stack_layers(new_unrolled))  # bit for bit (PiSSA/MiLoRA residuals too)
    _equal_trees(adapter, registry.stack_layers(adapter_u))
    assert peft.trainable_count(method, adapter) == peft.trainable_count(method, adapter_u) > 0
    labels, labels_u = peft.labels(method, adapter), peft.labels(method, adapter_u)
    assert {k: v for k, v in labels.items() if k != "layers"} == {
        k: v for k, v in labels_u.items() if registry.layer_index(k) is None}
    for i in range(CFG.num_layers):
        assert labels["layers"] == labels_u[f"layers_{i}"]
    trained = _noisy(adapter, 4)
    merged = peft.merge(method, new_params, trained)
    merged_u = peft.merge(method, new_unrolled, registry.unstack_layers(trained))
    assert "layers" in merged
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(registry.stack_layers(merged_u))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_adalora_on_step_and_regulariser_match_the_unrolled_layout():
    params, unrolled = _stacked_and_unrolled()
    method = peft.get("adalora", init_r=4, target_r=1, alpha=4, total_step=6, tinit=1, tfinal=1)
    _, adapter = peft.init_adapter(method, jax.random.key(1), params)
    adapter = _noisy(adapter, 11)  # non-zero singular values, so masking shows
    adapter_u = registry.unstack_layers(adapter)
    grads = _noisy(jax.tree.map(jnp.zeros_like, adapter), 5)
    state, state_u = method.init_state(adapter), method.init_state(adapter_u)
    np.testing.assert_allclose(method.regularizer(adapter), method.regularizer(adapter_u), rtol=1e-6)
    for step in range(6):
        adapter, state = method.on_step(step, grads, adapter, state)
        adapter_u, state_u = method.on_step(step, registry.unstack_layers(grads), adapter_u, state_u)
    assert "layers" in adapter
    _equal_trees(adapter, registry.stack_layers(adapter_u))
    _equal_trees(state, state_u)
    flat = jax.tree_util.tree_flatten_with_path(adapter["layers"])[0]
    singular_values = [leaf for path, leaf in flat if path[-1].key == "lora_e"]
    assert len(singular_values) == 7 and singular_values[0].shape == (CFG.num_layers, 4)
    kept = sum(int(jnp.sum(e != 0)) for e in singular_values)
    assert kept == 1 * 7 * CFG.num_layers  # target_r over every module of every layer
    assert sum(int(jnp.sum(k)) for k in jax.tree.leaves(state["pattern"])) == kept


def test_lorafa_preconditioner_is_per_layer():
    params, _ = _stacked_and_unrolled()
    method = peft.get("lorafa", r=2, alpha=4)
    _, adapter = peft.init_adapter(method, jax.random.key(1), params)
    grads = _noisy(jax.tree.map(jnp.zeros_like, adapter), 6)
    tx = optim.make_optimizer(method, adapter, 1e-3)
    tx_u = optim.make_optimizer(method, registry.unstack_layers(adapter), 1e-3)
    updates, _ = tx.update(grads, tx.init(adapter), adapter)
    updates_u, _ = tx_u.update(registry.unstack_layers(grads), tx_u.init(registry.unstack_layers(adapter)),
                               registry.unstack_layers(adapter))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(registry.stack_layers(updates_u))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_per_layer_targets_keep_the_unrolled_layout():
    params, unrolled = _stacked_and_unrolled()
    method = peft.get("lora", r=2, alpha=4, target_modules=("layers_1/self_attn/q_proj", "v_proj"))
    new_params, adapter = peft.init_adapter(method, jax.random.key(1), params)
    assert "layers" not in new_params and "layers_2" in new_params and "layers" not in adapter
    assert set(adapter["layers_1"]["self_attn"]) == {"q_proj", "v_proj"}
    assert set(adapter["layers_0"]["self_attn"]) == {"v_proj"}
    _, adapter_u = peft.init_adapter(method, jax.random.key(1), unrolled)
    _equal_trees(adapter, adapter_u)
    adapter = _noisy(adapter, 8)
    model = tfm.Transformer(CFG, peft=method)  # follows the layout of the params it is applied to
    out = model.apply({"params": new_params, "adapter": adapter}, TOKENS)
    ref = tfm.Transformer(CFG.replace(scan_layers=False), peft=method).apply(
        {"params": unrolled, "adapter": adapter}, TOKENS)
    np.testing.assert_array_equal(out, ref)
    assert float(jnp.abs(out - model.apply({"params": params}, TOKENS)).max()) > 1e-4
    # A pattern with a layer glob that covers every layer stays scanned.
    every = peft.get("lora", r=2, alpha=4, target_modules=("layers_[0-9]/mlp/up_proj",))
    _, stacked = peft.init_adapter(every, jax.random.key(1), params)
    assert list(stacked) == ["layers"] and list(stacked["layers"]["mlp"]) == ["up_proj"]


def test_adapters_written_before_scanning_are_refused_or_converted():
    params, _ = _stacked_and_unrolled()
    method = peft.get("lora", r=2, alpha=4)
    _, adapter = peft.init_adapter(method, jax.random.key(1), params)
    adapter = _noisy(adapter, 9)
    old = registry.unstack_layers(adapter)  # an adapter tree as workdirs held it before
    model = tfm.Transformer(CFG, peft=method)
    with pytest.raises(ValueError, match="stack_layers"):
        model.apply({"params": params, "adapter": old}, TOKENS)
    np.testing.assert_array_equal(model.apply({"params": params, "adapter": registry.stack_layers(old)}, TOKENS),
                                  model.apply({"params": params, "adapter": adapter}, TOKENS))
    with pytest.raises(ValueError, match="unrolled"):
        model.apply({"params": registry.unstack_layers(params), "adapter": adapter}, TOKENS)
    with pytest.raises(ValueError, match="layer 1 differs"):
        registry.stack_layers({"layers_0": {"w": jnp.zeros(2)}, "layers_1": {"w": jnp.zeros(3)}})


def test_hf_load_sharded_stacks_every_layer_and_peft_export_names_are_per_layer(tmp_path):
    params, unrolled = _stacked_and_unrolled()
    hf.save(tmp_path, tfm.Transformer(CFG), params)
    mesh = mesh_lib.make_mesh(1, 4, 2)
    _, loaded = hf.load(tmp_path, dtype=jnp.float32, mesh=mesh)
    _, loaded_u = hf.load(tmp_path, dtype=jnp.float32, scan_layers=False)
    _equal_trees(loaded, params)
    _equal_trees(loaded_u, unrolled)
    kernel = loaded["layers"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec[0] is None
    method = peft.get("lora", r=2, alpha=4, target_modules=("q_proj", "down_proj"))
    _, adapter = peft.init_adapter(method, jax.random.key(1), params)
    adapter = _noisy(adapter, 10)
    state = hf_peft.to_hf_state_dict(method, params, adapter)
    assert len(state) == 2 * 2 * CFG.num_layers
    name = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    np.testing.assert_array_equal(state[name], np.asarray(adapter["layers"]["self_attn"]["q_proj"]["lora_a"][2]).T)
    state_u = hf_peft.to_hf_state_dict(method, unrolled, registry.unstack_layers(adapter))
    assert sorted(state) == sorted(state_u)
    for k, v in state.items():
        np.testing.assert_array_equal(v, state_u[k])
    hf_peft.save_adapter(tmp_path / "adapter", method, params, adapter)
    method2, _, back = hf_peft.load_adapter(tmp_path / "adapter", CFG, params)
    assert "layers" in back
    _equal_trees(back, adapter)
