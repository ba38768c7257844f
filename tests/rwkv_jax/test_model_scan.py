"""RWKV-7's scanned blocks (1 ... L-1 stacked under `blocks`, block 0 apart): the official round trip is
exact in both layouts, init is the same in both, scanned == unrolled (logits, states, gradients through an
adapter), per-layer PEFT targets adapt only the chosen blocks (and train on the training core), and a
workdir written before the blocks were stacked is refused."""

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft as sft_configs
from jaxrl_peft import peft
from jaxrl_peft.infra import checkpoint, mesh as mesh_lib
from jaxrl_peft.peft import registry
from jaxrl_peft.train import loop, sft
from rwkv_jax import model as rwkv_model
from rwkv_jax.model import RWKV7, RWKV7Config

CFG = RWKV7Config(vocab_size=64, n_embd=64, n_layer=4, head_size=32, dim_ffn=128, decay_lora=8, iclr_lora=8,
                  value_lora=8, gate_lora=8)
UNROLLED = dataclasses.replace(CFG, scan_layers=False)
TINY_RWKV7 = Path(__file__).resolve().parents[2] / "assets" / "tiny-rwkv7"


def official_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of an official x070 file of CFG's shape (released files also carry block 0's unused
    v0/v1/v2), random fp32 values at moderate scales."""
    rng = np.random.default_rng(seed)
    shapes = rwkv_model.official_shapes(CFG)
    C, D = CFG.n_embd, CFG.value_lora
    shapes.update({"blocks.0.att.v0": (1, 1, C), "blocks.0.att.v1": (C, D), "blocks.0.att.v2": (D, C)})
    out = {}
    for name, shape in shapes.items():
        x = rng.normal(0.0, 0.3 if len(shape) < 2 else shape[-1] ** -0.5, shape)
        out[name] = (x + 1.0 if name.endswith(".weight") and len(shape) == 1 else x).astype(np.float32)
    return out


def _equal_trees(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _noisy(tree, seed: int):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape), x.dtype)
                                        for x in leaves])


@pytest.fixture(scope="module")
def tensors():
    return official_tensors()


@pytest.fixture(scope="module")
def stacked(tensors):
    return rwkv_model.params_from_official(tensors, CFG)


def test_stacked_official_round_trip_is_exact(tensors, stacked, tmp_path):
    unrolled = rwkv_model.params_from_official(tensors, UNROLLED)
    assert sorted(stacked) == ["blocks", "blocks_0", "emb", "head", "ln_out"]
    assert "ln0" in stacked["blocks_0"] and "v0" not in stacked["blocks_0"]["att"]
    assert "ln0" not in stacked["blocks"] and stacked["blocks"]["att"]["v1"]["kernel"].shape == (3, 64, 8)
    for i in range(1, CFG.n_layer):  # block i is entry i-1 of the stack
        np.testing.assert_array_equal(stacked["blocks"]["att"]["key"]["kernel"][i - 1],
                                      tensors[f"blocks.{i}.att.key.weight"].T)
        np.testing.assert_array_equal(stacked["blocks"]["att"]["w0"][i - 1], tensors[f"blocks.{i}.att.w0"][0, 0])
    assert sorted(unrolled) == ["blocks_0", "blocks_1", "blocks_2", "blocks_3", "emb", "head", "ln_out"]
    _equal_trees(registry.unstack_layers(stacked), unrolled)
    _equal_trees(registry.stack_layers(unrolled), stacked)
    unused = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
    want = {k: v for k, v in tensors.items() if k not in unused}
    for params in (stacked, unrolled):
        out = rwkv_model.params_to_official(params, CFG)
        assert out.keys() == want.keys()
        for name, x in want.items():
            assert out[name].shape == x.shape and out[name].dtype == x.dtype, name
            np.testing.assert_array_equal(out[name], x, err_msg=name)
    # save writes the official layout (one tensor per block); load stacks it again.
    rwkv_model.save(str(tmp_path), CFG, stacked)
    config, on_disk = rwkv_model.read_checkpoint(str(tmp_path))
    assert config.arch_dict() == CFG.arch_dict() and on_disk.keys() == want.keys()
    for name, x in want.items():
        np.testing.assert_array_equal(on_disk[name], x, err_msg=name)
    _, loaded = rwkv_model.load(str(tmp_path))
    _equal_trees(loaded, stacked)
    # The model's own init, abstract_params and param_axes have the loader's layout.
    assert jax.tree.structure(nn.unbox(rwkv_model.abstract_params(CFG))) == jax.tree.structure(stacked)
    axes = rwkv_model.param_axes(CFG)
    assert axes["blocks"]["att"]["key"]["kernel"] == ("layers", "embed", "heads")
    assert axes["blocks_0"]["att"]["key"]["kernel"] == ("embed", "heads")
    assert jax.tree.structure(nn.unbox(rwkv_model.abstract_params(UNROLLED))) == jax.tree.structure(unrolled)


def test_init_is_the_same_in_both_layouts():
    """init_params draws per named block, so a seed gives the same numbers stacked or not; the scanned
    module's own init (layer ids traced) gives the same official per-layer constants."""
    params = rwkv_model.init_params(CFG, jax.random.key(0))
    unrolled = rwkv_model.init_params(UNROLLED, jax.random.key(0))
    assert "blocks" in params and "blocks_1" in unrolled
    _equal_trees(registry.unstack_layers(params), unrolled)
    own = nn.unbox(RWKV7(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    assert jax.tree.structure(own) == jax.tree.structure(params)
    constants = [("att", n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "v0")]
    for sub, name in constants + [("ffn", "x_k"), ("att", "ln_x")]:
        want, got = params["blocks"][sub][name], own["blocks"][sub][name]
        assert _max_diff(got, want) <= 1e-5, (sub, name)
    np.testing.assert_allclose(own["blocks"]["att"]["ln_x"]["scale"][:, 0], [((i + 1) / 4) ** 0.7 for i in (1, 2, 3)],
                               rtol=1e-6)


def test_scanned_equals_unrolled_with_an_adapter(stacked):
    """Parallel and recurrent modes with left padding, from a nonzero state: logits, states and adapter
    gradients of the scanned blocks equal the unrolled ones."""
    method = peft.get("lora", r=2, alpha=4, target_modules=rwkv_model.LINEAR_MODULES + ("att/v1",))
    params, adapter = registry.init_adapter(method, jax.random.key(1), stacked)
    assert sorted(adapter) == ["blocks", "blocks_0"] and "v1" not in adapter["blocks_0"]["att"]
    assert adapter["blocks"]["att"]["v1"]["lora_b"].shape[0] == CFG.n_layer - 1
    adapter = _noisy(adapter, 2)  # LoRA B off zero, so the adapter changes the output
    model = RWKV7(CFG, peft=method)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(1, 64, (2, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [3]]))
    start = rwkv_model.RWKV7State(*(jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
                                    for x in rwkv_model.init_state(CFG, 2)))

    def run(p, a):
        par, state = model.apply({"params": p, "adapter": a}, tokens, start, mask=mask)
        rec, rec_state = model.apply({"params": p, "adapter": a}, tokens[:, :1], state, recurrent=True)
        return par, state, rec, rec_state

    def loss(a, p):
        par, state, rec, _ = run(p, a)
        return jnp.mean(par ** 2) + jnp.mean(rec ** 2) + jnp.mean(state.wkv ** 2)

    unrolled, adapter_u = registry.unstack_layers(params), registry.unstack_layers(adapter)
    scanned_out, unrolled_out = jax.jit(run)(params, adapter), jax.jit(run)(unrolled, adapter_u)
    print(f"scanned vs unrolled: max |d| = {_max_diff(scanned_out, unrolled_out):.2e}")
    assert _max_diff(scanned_out, unrolled_out) <= 1e-5
    base, _ = RWKV7(CFG).apply({"params": params}, tokens, start, mask=mask)
    assert _max_diff(base, scanned_out[0]) > 1e-3  # the adapter of every block takes part
    g = jax.jit(jax.grad(loss))(adapter, params)
    g_u = jax.jit(jax.grad(loss))(adapter_u, unrolled)
    assert _max_diff(g, registry.stack_layers(g_u)) <= 1e-5
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g["blocks"]))
    with pytest.raises(ValueError, match="stack_layers"):  # an adapter in the other layout
        model.apply({"params": params, "adapter": adapter_u}, tokens)
    with pytest.raises(ValueError, match="stack_layers"):
        model.apply({"params": unrolled, "adapter": adapter}, tokens)


def test_per_layer_targets_adapt_only_the_chosen_blocks(stacked):
    tokens = jnp.asarray(np.random.default_rng(4).integers(1, 64, (2, 7)), jnp.int32)
    method = peft.get("lora", r=2, alpha=4, target_modules=("blocks_[13]/att/key", "blocks_3/ffn/value"))
    params, adapter = registry.init_adapter(method, jax.random.key(1), stacked)
    # The adapter differs between blocks, so params and adapter come back unrolled, as the decoder's do.
    assert sorted(adapter) == ["blocks_1", "blocks_3"]
    assert adapter["blocks_1"].keys() == {"att"} and adapter["blocks_3"].keys() == {"att", "ffn"}
    _equal_trees(params, registry.unstack_layers(stacked))
    adapter = _noisy(adapter, 5)
    merged = registry.merge(method, params, adapter)
    changed = sorted(jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(merged)[0],
                                                                   jax.tree.leaves(params))
                     if not np.array_equal(np.asarray(a), np.asarray(b)))
    assert changed == ["['blocks_1']['att']['key']['kernel']", "['blocks_3']['att']['key']['kernel']",
                       "['blocks_3']['ffn']['value']['kernel']"]
    adapted, _ = RWKV7(CFG, peft=method).apply({"params": params, "adapter": adapter}, tokens)
    plain, _ = RWKV7(CFG).apply({"params": merged}, tokens)
    assert _max_diff(adapted, plain) <= 1e-4
    assert _max_diff(adapted, RWKV7(CFG).apply({"params": stacked}, tokens)[0]) > 1e-3
    # Block 0 alone keeps the stacked layout (nothing of blocks 1 ... L-1 is adapted).
    method0 = peft.get("lora", r=2, alpha=4, target_modules=("blocks_0/att/key",))
    params0, adapter0 = registry.init_adapter(method0, jax.random.key(1), stacked)
    assert sorted(adapter0) == ["blocks_0"]
    _equal_trees(params0, stacked)
    RWKV7(CFG, peft=method0).apply({"params": params0, "adapter": adapter0}, tokens)


def test_residual_method_rewrites_stay_stacked(stacked):
    """PiSSA rewrites every targeted base kernel: block 0's in place, blocks 1 ... L-1's stacked; the
    residual plus the adapter is the original weight again."""
    method = peft.get("pissa", r=4, alpha=4, target_modules=("att/key",))
    params, adapter = registry.init_adapter(method, jax.random.key(1), stacked)
    assert sorted(params) == sorted(stacked) and sorted(adapter) == ["blocks", "blocks_0"]
    for name in ("blocks_0", "blocks"):
        assert not np.array_equal(np.asarray(params[name]["att"]["key"]["kernel"]),
                                  np.asarray(stacked[name]["att"]["key"]["kernel"]))
    assert _max_diff(registry.merge(method, params, adapter), stacked) <= 1e-5


ONE = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
EXAMPLES = [([1, 5, 6], [7, 8, 2]), ([1, 9], [10, 11, 12, 2])]


def _sft_config(checkpoint_dir, targets: tuple[str, ...], steps: int = 4):
    c = sft_configs.get_config("tiny")
    c.model.checkpoint = str(checkpoint_dir)
    c.peft.hparams = dict(r=4, alpha=8, target_modules=targets)
    c.sft.update(batch_size=2, micro_batch_size=1, seq_len=16)
    c.optim.update(learning_rate=1e-2, warmup_steps=0)
    c.data.update(train="", heldout="")
    c.steps, c.eval_every, c.checkpoint_every, c.log_every = steps, 0, 10, 100
    return c


def test_per_layer_targets_train(tmp_path):
    """The training core places and trains an adapter on block 2 alone of a 3-block RWKV-7 (the params
    come back unrolled, and the logical axes follow them)."""
    ckpt = tmp_path / "rwkv7"
    config = dataclasses.replace(CFG, vocab_size=768, n_layer=3)  # the tokenizer of assets/tiny-rwkv7
    rwkv_model.save(str(ckpt), config, _noisy(rwkv_model.init_params(config, jax.random.key(0)), 1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).write_bytes((TINY_RWKV7 / name).read_bytes())
    c = _sft_config(ckpt, ("blocks_2/att/key",), steps=2)
    run = loop.train(sft.SFTTask(c, EXAMPLES), c, tmp_path / "run", mesh=ONE)
    assert sorted(run.frozen["base"]) == ["blocks_0", "blocks_1", "blocks_2", "emb", "head", "ln_out"]
    adapter = jax.device_get(run.state.adapter)
    assert sorted(adapter) == ["blocks_2"] and sorted(adapter["blocks_2"]["att"]) == ["key"]
    _equal_trees(checkpoint.read_state(tmp_path / "run", 2)["adapter"], adapter)
    assert np.any(np.asarray(adapter["blocks_2"]["att"]["key"]["lora_b"]) != 0)  # LoRA B starts at zero


def test_workdir_from_before_stacked_blocks_is_refused_clearly(tmp_path):
    c = _sft_config(TINY_RWKV7, ("att/key", "att/value"))
    run = loop.build(sft.SFTTask(c, EXAMPLES), c, ONE)
    new = jax.device_get(run.state.adapter)
    old = registry.unstack_layers(new)  # the adapter tree as RWKV-7 workdirs held it before
    assert "blocks_1" in old and "blocks" in new and "blocks_0" in new
    _equal_trees(registry.stack_layers(old), new)  # the conversion the message names
    checkpoint.save_config(tmp_path, c)
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(2, {"adapter": old, "opt": {}, "method": {}}, {"epoch": 0, "row": 0},
               {"eval_before": 0.0, "updates": 2})
    saver.close()
    with pytest.raises(loop.ConfigError, match=r"\(blocks_1 \.\.\.\): it was written before RWKV-7's blocks "
                                               r"1 \.\.\. L-1 were stacked.*registry\.stack_layers"):
        loop.train(sft.SFTTask(c, EXAMPLES), c, tmp_path, mesh=ONE)
