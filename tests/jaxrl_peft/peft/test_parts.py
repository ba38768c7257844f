"""The composite method 'parts': one PEFT method per top-level part of a model (full fine-tuning for a
connector, LoRA for the language model, the rest frozen), checked against each method alone on its
subtree, against a forward written out by hand, and through one real run of the training core."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrl_peft import peft
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import hf_peft
from jaxrl_peft.models.layers import LayerNorm, Linear
from jaxrl_peft.peft import optim, registry
from jaxrl_peft.peft.adalora import AdaLoRA
from jaxrl_peft.peft.base import IDENTITY, PeftMethod
from jaxrl_peft.peft.full import Full
from jaxrl_peft.peft.lora import LoRA, LoRAFA
from jaxrl_peft.peft.parts import Parts
from jaxrl_peft.train import loop, optimizer as optimizer_lib

D_IN, D_ENC, D_HID, D_EMB, D_FF, CLASSES = 6, 8, 16, 12, 24, 5
LM_TARGETS = ("up", "down")
ONE = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])


class Encoder(nn.Module):
    """Stands for the frozen vision encoder: a part no method names."""

    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(Linear(D_ENC, axes=("embed", "mlp"), peft=self.peft, name="proj")(x))


class Connector(nn.Module):
    """Linear -> LayerNorm -> gelu -> Linear, like ModRWKV's adapter."""

    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x):
        x = Linear(D_HID, axes=("embed", "mlp"), use_bias=True, peft=self.peft, name="proj_in")(x)
        x = LayerNorm(peft=self.peft, name="norm")(x)
        return Linear(D_EMB, axes=("mlp", "embed"), use_bias=True, peft=self.peft, name="proj_out")(jax.nn.gelu(x))


class LM(nn.Module):
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(Linear(D_FF, axes=("embed", "mlp"), peft=self.peft, name="up")(x))
        return Linear(CLASSES, axes=("mlp", "vocab"), peft=self.peft, name="down")(h)


class ThreePart(nn.Module):
    """encoder -> adapter -> llm, each top-level submodule built with its part's method."""

    peft: PeftMethod = IDENTITY

    def setup(self):
        self.encoder = Encoder(peft=self.peft.part("encoder"))
        self.adapter = Connector(peft=self.peft.part("adapter"))
        self.llm = LM(peft=self.peft.part("llm"))

    def __call__(self, x):
        return self.llm(self.adapter(self.encoder(x)))


def _init():
    boxed = ThreePart().init(jax.random.key(0), jnp.zeros((1, D_IN)))["params"]
    axes = jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
    params = nn.unbox(boxed)
    # Random norm gains and biases, so that a copy that is not used shows.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(p + 0.3 * rng.standard_normal(p.shape), jnp.float32), params)
    return params, axes


PARAMS, AXES = _init()
X = jnp.asarray(np.random.default_rng(1).standard_normal((4, D_IN)), jnp.float32)


def _lora(**kw) -> LoRA:
    return LoRA(**{"r": 2, "alpha": 4.0, "target_modules": LM_TARGETS, **kw})


def _method(llm: PeftMethod | None = None) -> Parts:
    return Parts(parts={"adapter": Full(), "llm": llm or _lora()}).prepare(PARAMS)


def _randomize(tree, seed: int, scale: float = 0.2):
    """Every leaf plus noise, so that no check can pass on an adapter that does nothing."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), tree)


def _keys(tree) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_equal(a, b):
    assert _keys(a) == _keys(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _by_hand(params, adapter, x):
    """The forward with full fine-tuning on 'adapter' and LoRA (r=2, alpha=4) on 'llm', written out."""
    e = jnp.tanh(x @ params["encoder"]["proj"]["kernel"])
    full = adapter["adapter"]
    h = e @ full["proj_in"]["kernel"] + full["proj_in"]["bias"]
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    h = (h - mean) / jnp.sqrt(var + 1e-5) * full["norm"]["scale"] + full["norm"]["bias"]
    h = jax.nn.gelu(h) @ full["proj_out"]["kernel"] + full["proj_out"]["bias"]
    lora, base, s = adapter["llm"], params["llm"], 4.0 / 2

    def lin(name, v):
        return v @ base[name]["kernel"] + s * (v @ lora[name]["lora_a"]) @ lora[name]["lora_b"]
    return lin("down", jax.nn.gelu(lin("up", h)))


# ------------------------------------------------------------------------------ (1) adapters, forward

def test_each_part_gets_its_own_methods_adapter_and_the_forward_combines_them():
    method = _method()
    key = jax.random.key(7)
    new_params, adapter = registry.init_adapter(method, key, PARAMS)
    # Exactly what each method gives alone on its part's subtree, with the part's key (a fold-in of its name).
    assert set(adapter) == {"adapter", "llm"}  # the unnamed encoder gets nothing
    np.testing.assert_array_equal(jax.random.key_data(registry.part_key(key, "llm")), jax.random.key_data(
        jax.random.fold_in(key, zlib.crc32(b"llm") & 0x7FFFFFFF)))
    _assert_trees_equal(adapter["adapter"], registry.init_adapter(Full(), registry.part_key(key, "adapter"),
                                                                  PARAMS["adapter"])[1])
    _assert_trees_equal(adapter["llm"], registry.init_adapter(_lora(), registry.part_key(key, "llm"), PARAMS["llm"])[1])
    assert _keys(adapter["adapter"]) == _keys(PARAMS["adapter"])  # a copy of every connector leaf
    assert _keys(adapter["llm"]) == {f"['{m}']['{k}']" for m in LM_TARGETS for k in ("lora_a", "lora_b")}
    _assert_trees_equal(new_params, PARAMS)
    # The two LoRA modules draw different A (keys from their paths inside the part).
    assert not np.allclose(adapter["llm"]["up"]["lora_a"][:D_EMB], adapter["llm"]["down"]["lora_a"][:D_EMB])

    trained = _randomize(adapter, seed=3)
    model = ThreePart(peft=method)
    variables = method.model_variables(PARAMS, trained)
    assert set(variables) == {"params", "adapter"} and set(variables["adapter"]) == {"llm"}
    out = model.apply(variables, X)
    want = _by_hand(PARAMS, trained, X)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    base_out = ThreePart().apply({"params": PARAMS}, X)
    assert not np.allclose(out, base_out, atol=1e-3)
    # Without the base copies that full fine-tuning replaces: same output, and the other parts keep theirs.
    dropped = registry.drop_replaced(method, PARAMS, trained)
    assert all(np.ndim(leaf) == 0 for leaf in jax.tree.leaves(dropped["adapter"]))
    _assert_trees_equal({k: dropped[k] for k in ("encoder", "llm")}, {k: PARAMS[k] for k in ("encoder", "llm")})
    np.testing.assert_allclose(model.apply(method.model_variables(dropped, trained), X), want, rtol=1e-5, atol=1e-6)
    # Merged weights run on the plain model and give the same output, from either base.
    for base in (PARAMS, dropped):
        merged = registry.merge(method, base, trained)
        _assert_trees_equal(merged["encoder"], PARAMS["encoder"])
        np.testing.assert_allclose(ThreePart().apply({"params": merged}, X), want, rtol=1e-5, atol=1e-5)


def test_counts_labels_and_axes_are_each_parts():
    method = _method(LoRA(r=2, alpha=4.0, target_modules=LM_TARGETS))
    _, adapter = registry.init_adapter(method, jax.random.key(0), PARAMS)
    n_connector = sum(int(np.size(x)) for x in jax.tree.leaves(PARAMS["adapter"]))
    n_lora = 2 * (D_EMB + D_FF) + 2 * (D_FF + CLASSES)
    assert registry.trainable_count(method, adapter) == n_connector + n_lora
    axes = registry.adapter_axes(method, AXES, adapter)
    assert axes["adapter"]["proj_in"] == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}
    assert axes["adapter"]["norm"] == {"scale": ("norm",), "bias": ("norm",)}
    assert axes["llm"]["down"] == {"lora_a": ("mlp", "rank"), "lora_b": ("rank", "vocab")}
    plus = Parts(parts={"adapter": Full(), "llm": peft.get("loraplus", r=2, target_modules=LM_TARGETS)})
    labels = registry.labels(plus, adapter)
    assert set(jax.tree.leaves(labels["adapter"])) == {"default"}
    assert labels["llm"]["up"] == {"lora_a": "default", "lora_b": "lora_b"}


def test_a_parts_own_stacked_layers_stay_stacked():
    rng = np.random.default_rng(3)
    stacked = {"layers": {"mlp": {"up_proj": {"kernel": jnp.asarray(rng.standard_normal((3, 6, 8)), jnp.float32)}},
                          "input_layernorm": {"scale": jnp.ones((3, 6))}},
               "norm": {"scale": jnp.ones(6)}}  # a decoder's layers under one 'layers' subtree
    stacked_axes = {"layers": {"mlp": {"up_proj": {"kernel": ("layers", "embed", "mlp")}},
                               "input_layernorm": {"scale": ("layers", "norm")}}, "norm": {"scale": ("norm",)}}
    params = {"adapter": PARAMS["adapter"], "llm": stacked}
    assert registry.is_stacked(params["llm"])
    lora = LoRA(r=2, target_modules=("up_proj",))
    method = Parts(parts={"adapter": Full(), "llm": lora})
    key = jax.random.key(1)
    _, adapter = registry.init_adapter(method, key, params)
    _assert_trees_equal(adapter["llm"], registry.init_adapter(lora, registry.part_key(key, "llm"), stacked)[1])
    assert adapter["llm"]["layers"]["mlp"]["up_proj"]["lora_a"].shape == (3, 6, 2)
    # Layer i's factors are drawn with the key of its unrolled path inside the part, 'layers_<i>/mlp/up_proj'.
    layer_1 = registry.init_adapter(lora, registry.part_key(key, "llm"), registry.unstack_layers(stacked))[1]
    np.testing.assert_array_equal(adapter["llm"]["layers"]["mlp"]["up_proj"]["lora_a"][1],
                                  layer_1["layers_1"]["mlp"]["up_proj"]["lora_a"])
    axes = registry.adapter_axes(method, {"adapter": AXES["adapter"], "llm": stacked_axes}, adapter)
    assert axes["llm"]["layers"]["mlp"]["up_proj"] == {"lora_a": ("layers", "embed", "rank"),
                                                       "lora_b": ("layers", "rank", "mlp")}


# ------------------------------------------------------------------------------ (2) gradients

def test_only_the_parts_trainable_leaves_get_gradients():
    method = _method(LoRAFA(r=2, alpha=4.0, target_modules=LM_TARGETS))
    _, adapter = registry.init_adapter(method, jax.random.key(0), PARAMS)
    adapter = _randomize(adapter, seed=4)  # B != 0, so A gets a gradient too
    model = ThreePart(peft=method)
    y = jnp.arange(X.shape[0]) % CLASSES

    def loss(a, p):
        logits = model.apply(method.model_variables(p, a), X)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1).mean()

    grads, base_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(adapter, PARAMS)
    assert set(grads) == {"adapter", "llm"}  # the encoder has no adapter: nothing of it can train
    # Every trained leaf of both parts has a gradient; LoRA-FA's A (frozen, under stop_gradient) has none.
    labels = registry.labels(method, adapter)
    assert labels["llm"]["up"] == {"lora_a": "frozen", "lora_b": "lorafa"}
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    zero = {jax.tree_util.keystr(p) for p, g in flat if not np.any(g)}
    frozen = {jax.tree_util.keystr(p) for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0] if lab == "frozen"}
    assert zero == frozen == {f"['llm']['{m}']['lora_a']" for m in LM_TARGETS}, zero
    # The base copies full fine-tuning replaces are not used at all; the frozen parts' bases are.
    assert not any(np.any(g) for g in jax.tree.leaves(base_grads["adapter"]))
    assert np.any(base_grads["encoder"]["proj"]["kernel"]) and np.any(base_grads["llm"]["up"]["kernel"])
    # The optimizer does not move LoRA-FA's A.
    tx = optim.make_optimizer(method, adapter, 1e-2)
    updates, _ = tx.update(grads, tx.init(adapter), adapter)
    assert not np.any(updates["llm"]["up"]["lora_a"]) and np.any(updates["llm"]["up"]["lora_b"])


def test_optimizer_precondition_regularizer_and_on_step_run_per_part():
    lorafa = LoRAFA(r=2, alpha=4.0, target_modules=LM_TARGETS)
    method = _method(lorafa)
    _, adapter = registry.init_adapter(method, jax.random.key(0), PARAMS)
    adapter = _randomize(adapter, seed=5)
    grads = _randomize(jax.tree.map(jnp.zeros_like, adapter), seed=6, scale=1.0)
    # LoRA-FA's projected gradient on the llm part only; the full part's gradient passes through.
    pre = optim.precondition(method)
    got, _ = pre.update(grads, pre.init(adapter), adapter)
    alone = optim.precondition(lorafa)
    want, _ = alone.update(grads["llm"], alone.init(adapter["llm"]), adapter["llm"])
    _assert_trees_equal(got["llm"], want)
    assert not np.allclose(got["llm"]["up"]["lora_b"], grads["llm"]["up"]["lora_b"])
    _assert_trees_equal(got["adapter"], grads["adapter"])
    # The whole optimizer: each part's update is what its method's optimizer gives on its subtree alone.
    tx = optim.make_optimizer(method, adapter, 1e-2, weight_decay=0.01)
    updates, _ = tx.update(grads, tx.init(adapter), adapter)
    for name, sub in (("adapter", Full()), ("llm", lorafa)):
        tx_sub = optim.make_optimizer(sub, adapter[name], 1e-2, weight_decay=0.01)
        want, _ = tx_sub.update(grads[name], tx_sub.init(adapter[name]), adapter[name])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), updates[name], want)

    # AdaLoRA on the llm part: its orthogonality term, its allocator state and its rank pruning.
    ada = AdaLoRA(init_r=4, target_r=1, total_step=10, tinit=1, tfinal=2, target_modules=LM_TARGETS)
    method = _method(ada)
    _, adapter = registry.init_adapter(method, jax.random.key(0), PARAMS)
    adapter = _randomize(adapter, seed=7)
    grads = _randomize(jax.tree.map(jnp.zeros_like, adapter), seed=8, scale=1.0)
    reg = method.regularizer(adapter)
    np.testing.assert_allclose(reg, ada.regularizer(adapter["llm"]), rtol=1e-6)
    assert float(reg) > 0
    state = method.init_state(adapter)
    assert set(state) == {"llm"}
    _assert_trees_equal(state["llm"], ada.init_state(adapter["llm"]))
    step = jnp.asarray(5)  # EMAs updated, then masked to the scheduled budget: 2 triplets in all
    new_adapter, new_state = jax.jit(method.on_step)(step, grads, adapter, state)
    want_llm, want_state = jax.jit(ada.on_step)(step, grads["llm"], adapter["llm"], state["llm"])
    _assert_trees_equal(new_adapter["adapter"], adapter["adapter"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_adapter["llm"], want_llm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state["llm"], want_state)
    assert int(sum(np.count_nonzero(m["lora_e"]) for m in new_adapter["llm"].values())) == 2
    # Parts without per-step state keep none.
    plain = _method()
    assert plain.init_state(adapter) is None
    assert plain.on_step(step, grads, adapter, None)[1] is None


def test_residual_and_replaced_base_follow_the_parts():
    assert not _method().residual and peft.get("parts", parts={"llm": {"name": "pissa"}}).residual
    assert not _method().replaces_base() and Parts(parts={"adapter": Full()}).replaces_base()
    assert peft.get("parts", parts={"llm": {"name": "pissa"}}).part("adapter") is IDENTITY


# ------------------------------------------------------------------------------ (3) the training core

class _Task:
    """Classifies random inputs through the three-part model (the loop's Task protocol, nothing else)."""

    name = "parts"
    eval_metric = "loss"
    progress_keys = ("loss",)
    micro_batch_size = 4
    updates_per_batch = 1
    data_files: dict = {}

    def __init__(self, c):
        self.c = c
        rng = np.random.default_rng(2)
        self.x = rng.standard_normal((8, D_IN)).astype(np.float32)
        self.y = (np.arange(8) % CLASSES).astype(np.int32)

    def setup(self, mesh):
        self.method = registry.from_config(self.c.peft).prepare(PARAMS)
        self.model = ThreePart(peft=self.method)
        return loop.Setup(PARAMS, AXES, self.method)

    def next_batch(self, step, frozen, adapter):
        return {"x": self.x, "y": self.y, "w": np.ones(8, np.float32)}, {"rows": 8.0}, {}

    def data_state(self):
        return {}

    def restore_data_state(self, state):
        pass

    def pre_update(self, frozen, adapter, batch):
        return {}

    def loss(self, frozen, adapter, batch, totals):
        logits = self.model.apply(self.method.model_variables(frozen["base"], adapter), batch["x"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], -1)[:, 0] * batch["w"]
        return nll.sum() / totals["rows"], {"weight": batch["w"].sum()}

    def evaluate(self, frozen, adapter):
        return 0.0

    def close(self):
        pass


def test_the_training_core_trains_each_part_with_its_method():
    lr, ratio = 1e-2, 4.0
    c = ml_collections.ConfigDict(dict(seed=0, steps=12, optim=optimizer_lib.config(
        learning_rate=lr, loraplus_ratio=ratio, grad_clip=1.0)))
    c.peft = ml_collections.ConfigDict(dict(name="parts", hparams=dict(parts={
        "adapter": {"name": "full", "hparams": {}},
        "llm": {"name": "loraplus", "hparams": {"r": 2, "alpha": 4, "target_modules": list(LM_TARGETS)}}})))
    run = loop.build(_Task(c), c, ONE)
    assert run.method.part("llm") == peft.get("loraplus", r=2, alpha=4, target_modules=LM_TARGETS)
    assert run.method.part("adapter") == Full() and run.method.part("encoder") is IDENTITY
    labels = registry.labels(run.method, run.state.adapter)
    assert labels["llm"]["down"] == {"lora_a": "default", "lora_b": "lora_b"}
    assert set(jax.tree.leaves(labels["adapter"])) == {"default"}
    # The base copies of the fully trained connector are dropped (no reference policy); the rest stay.
    assert all(np.ndim(x) == 0 for x in jax.tree.leaves(run.frozen["base"]["adapter"]))
    _assert_trees_equal(jax.device_get(run.frozen["base"]["llm"]), PARAMS["llm"])

    before = jax.device_get(run.state.adapter)
    task = run.task
    losses = []
    for step in range(c.steps):
        rows, totals, _ = task.next_batch(step, run.frozen, run.state.adapter)
        losses.append(run.update(rows, totals)["loss"])
        if step == 0:  # Adam's first step moves every leaf with a gradient by about its group's lr
            after = jax.device_get(run.state.adapter)
            delta = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)), after, before)
            np.testing.assert_allclose(delta["llm"]["up"]["lora_b"].max(), lr * ratio, rtol=1e-3)
            assert not np.any(delta["llm"]["up"]["lora_a"])  # B = 0 at init: no gradient for A yet
            np.testing.assert_allclose(delta["adapter"]["proj_in"]["kernel"].max(), lr, rtol=1e-3)
            np.testing.assert_allclose(delta["adapter"]["norm"]["bias"].max(), lr, rtol=1e-3)
    print("losses", [round(v, 4) for v in losses])
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(run.state.step) == c.steps


# ------------------------------------------------------------------------------ (4) errors

@pytest.mark.parametrize("parts, match", [
    ({"vision": {"name": "full"}},
     r"part\(s\) \['vision'\] are not top-level subtrees .* \['adapter', 'encoder', 'llm'\]"),
    ({"llm": {"name": "parts", "hparams": {}}}, "cannot itself be 'parts'"),
    ({"llm": {"name": "nope"}}, r"part 'llm': unknown PEFT method 'nope'"),
    ({"llm": {"hparams": {"r": 2}}}, "expected a block"),
    ({"llm": {"name": "lora", "hparam": {"r": 2}}}, r"unknown field\(s\) \['hparam'\]"),
    ({"llm": {"name": "lora", "hparams": {"r": 0}}}, "r must be a positive integer"),
    ({"llm/up": {"name": "lora"}}, "part names are top-level keys"),
    ({}, "name at least one part"),
])
def test_bad_parts_fail_clearly(parts, match):
    with pytest.raises(ValueError, match=match):
        peft.get("parts", parts=parts).prepare(PARAMS)


def test_misuse_fails_clearly(tmp_path):
    method = _method()
    with pytest.raises(ValueError, match=r"part\(s\) \['llm'\] are not top-level subtrees"):
        registry.init_adapter(method, jax.random.key(0), {"adapter": PARAMS["adapter"]})
    with pytest.raises(ValueError, match="cannot itself be a composite"):
        Parts(parts={"llm": method})
    with pytest.raises(ValueError, match="target_modules belong in each part"):
        peft.get("parts", parts={"llm": {"name": "lora"}}, target_modules=("up",))
    bad = Parts(parts={"llm": {"name": "lora", "hparams": {"target_modules": ("q_proj",)}}})
    with pytest.raises(ValueError, match=r"part 'llm': PEFT method 'lora': target_modules \('q_proj',\) matched no"):
        registry.init_adapter(bad, jax.random.key(0), PARAMS)
    _, adapter = registry.init_adapter(method, jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match=r"top-level entries \['encoder'\] that are none of its parts"):
        registry.labels(method, {**adapter, "encoder": {"proj": {"kernel": PARAMS["encoder"]["proj"]["kernel"]}}})
    # A model that hands the composite itself to a module, instead of each part's method.
    wrong = Linear(D_ENC, peft=method)
    with pytest.raises(ValueError, match=r"build each top-level submodule with its part's method, `method.part"):
        wrong.apply({"params": PARAMS["encoder"]["proj"], "adapter": {"lora_a": jnp.zeros((D_IN, 2)),
                                                                      "lora_b": jnp.zeros((2, D_ENC))}}, X)
    with pytest.raises(ValueError, match="'parts' has no Hugging Face PEFT format; export merged weights"):
        hf_peft.save_adapter(tmp_path / "a", method, PARAMS, adapter)
