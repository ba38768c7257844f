"""LoRA, rsLoRA, rank-1, LoRA+, LoRA-FA, DoRA, PiSSA, MiLoRA and AdaLoRA against Hugging Face PEFT.

On a tiny random Qwen2 (torch, CPU, fp32): no-op at init, logits and adapter gradients with identical
nonzero adapter weights, export to / import from the PEFT format, merged export, the optimizers of
LoRA+ and LoRA-FA, AdaLoRA's rank allocator and regulariser, and trainable-parameter counts for the
R1-Distill-Qwen-1.5B shape.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_utils as pu
from peft_utils import hf_peft_lib, torch, transformers

from jaxrl_peft import peft
from jaxrl_peft.models import transformer as tfm
from jaxrl_peft.models import hf_peft
from jaxrl_peft.peft import optim, registry
from jaxrl_peft.peft.base import ALL_LINEAR, PeftMethod
from jaxrl_peft.peft.svd_init import svd_lowrank

TOL = 1e-4
ALL7 = list(ALL_LINEAR)
KEY = jax.random.key(7)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pu.make_base(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def base_logits(base):
    return pu.our_logits(None, base, base.params, None, pu.inputs(1)[0])


def _lora_cfg(**kw):
    return lambda: hf_peft_lib.LoraConfig(**{"target_modules": ALL7, **kw})


# name -> (our method name, hyperparameters, HF PEFT config, method name HF's saved adapter loads as)
CASES = {
    "lora": ("lora", dict(r=4, alpha=8), _lora_cfg(r=4, lora_alpha=8), "lora"),
    "rslora": ("rslora", dict(r=4, alpha=8), _lora_cfg(r=4, lora_alpha=8, use_rslora=True), "rslora"),
    "loraplus": ("loraplus", dict(r=4, alpha=8), _lora_cfg(r=4, lora_alpha=8), "lora"),
    "lorafa": ("lorafa", dict(r=4, alpha=8), _lora_cfg(r=4, lora_alpha=8), "lora"),
    "dora": ("dora", dict(r=4, alpha=8), _lora_cfg(r=4, lora_alpha=8, use_dora=True), "dora"),
    "lora_some_layers": ("lora", dict(r=2, alpha=3, target_modules=("layers_1/self_attn/q_proj", "v_proj")),
                         _lora_cfg(r=2, lora_alpha=3, target_modules=r".*(layers\.1\.self_attn\.q_proj|v_proj)"),
                         "lora"),
    "adalora": ("adalora", dict(init_r=4, target_r=2, alpha=8, total_step=10),
                lambda: hf_peft_lib.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                                  target_modules=ALL7), "adalora"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_and_round_trips(base, base_logits, case, tmp_path):
    name, kw, hf_cfg, loads_as = CASES[case]
    method = peft.get(name, **kw)
    params, adapter0 = peft.init_adapter(method, KEY, base.params)
    tokens = pu.inputs(1)[0]
    assert np.abs(pu.our_logits(method, base, params, adapter0, tokens) - base_logits).max() <= 1e-5

    adapter = pu.randomize(adapter0, seed=3)
    pm = pu.peft_model(base, hf_cfg())
    if name == "lorafa":  # PEFT's create_lorafa_optimizer freezes A
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    pu.load_into_hf(pm, pu.to_hf_state(method, params, adapter))
    d_logits, d_grads = pu.compare_with_hf(method, base, params, adapter, pm)
    print(f"{case}: max|logits diff| {d_logits:.2e}  max|grad diff| {d_grads:.2e}")
    assert d_logits <= TOL and d_grads <= TOL

    ours = pu.our_logits(method, base, params, adapter, tokens)
    hf_peft.save_adapter(tmp_path / "ours", method, params, adapter, base_model_name_or_path=str(base.path))
    loaded = hf_peft_lib.PeftModel.from_pretrained(base.hf_model(), tmp_path / "ours").eval()
    assert np.abs(pu.hf_logits(loaded, tokens) - ours).max() <= TOL

    pm.save_pretrained(tmp_path / "theirs")
    method2, params2, adapter2 = hf_peft.load_adapter(tmp_path / "theirs", base.cfg, base.params)
    assert method2.name == loads_as
    assert np.abs(pu.our_logits(method2, base, params2, adapter2, tokens) - pu.hf_logits(pm, tokens)).max() <= TOL

    hf_peft.save_merged(tmp_path / "merged", base.model, method, params, adapter)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(pu.hf_logits(merged, tokens) - ours).max() <= TOL


def _raw_lora(a: dict) -> dict:
    """One module's trained factors in PEFT layout, without the PiSSA/MiLoRA conversion."""
    return {"lora_A.weight": np.asarray(a["lora_a"]).T, "lora_B.weight": np.asarray(a["lora_b"]).T}


def _modules(params, adapter):
    return [(p, m, a) for p, _, m, a in registry.map_modules(lambda p, k, m, a: (p, k, m, a), params, adapter) if a]


def test_pissa_matches_peft(base, base_logits, tmp_path):
    method = peft.get("pissa", r=4, alpha=8)
    params, adapter0 = peft.init_adapter(method, KEY, base.params)
    pm = pu.peft_model(base, hf_peft_lib.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                    target_modules=ALL7))
    # Initial factors equal PEFT's up to the sign of each singular pair; residual kernels equal.
    theirs = pu.hf_state_to_np(hf_peft_lib.get_peft_model_state_dict(pm))
    ours = pu.to_hf_state(method, params, adapter0, _raw_lora)
    hf_weights = {k: v.detach().numpy() for k, v in pm.state_dict().items() if k.endswith("base_layer.weight")}
    worst = 0.0
    for path, mod, a in _modules(params, adapter0):
        name = f"{hf_peft.PREFIX}{hf_peft.module_name(path)}"
        a_h, b_h = theirs[name + ".lora_A.weight"], theirs[name + ".lora_B.weight"]
        a_o, b_o = ours[name + ".lora_A.weight"], ours[name + ".lora_B.weight"]
        sign = np.sign(np.sum(a_o * a_h, axis=1))[:, None]  # [r, 1]
        worst = max(worst, np.abs(a_o * sign - a_h).max(), np.abs(b_o * sign.T - b_h).max(),
                    np.abs(np.asarray(mod["kernel"]).T - hf_weights[name + ".base_layer.weight"]).max())
    print(f"pissa init: max diff (sign-aligned factors, residual) {worst:.2e}")
    assert worst <= TOL
    tokens = pu.inputs(1)[0]
    assert np.abs(pu.our_logits(method, base, params, adapter0, tokens) - base_logits).max() <= TOL

    adapter = pu.randomize(adapter0, seed=4, skip=("lora_a0", "lora_b0"))
    pu.load_into_hf(pm, pu.to_hf_state(method, params, adapter, _raw_lora))
    d_logits, d_grads = pu.compare_with_hf(method, base, params, adapter, pm, to_hf=_raw_lora)
    print(f"pissa: max|logits diff| {d_logits:.2e}  max|grad diff| {d_grads:.2e}")
    assert d_logits <= TOL and d_grads <= TOL

    # Our export is a plain LoRA relative to the ORIGINAL weights (never double-counted).
    ours_logits = pu.our_logits(method, base, params, adapter, tokens)
    hf_peft.save_adapter(tmp_path / "ours", method, params, adapter)
    loaded = hf_peft_lib.PeftModel.from_pretrained(base.hf_model(), tmp_path / "ours").eval()
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].init_lora_weights is True
    assert np.abs(pu.hf_logits(loaded, tokens) - ours_logits).max() <= TOL
    # PEFT's unconverted save: our loader re-runs the SVD on the original weights, as PEFT does.
    pm.save_pretrained(tmp_path / "theirs")
    m2, p2, a2 = hf_peft.load_adapter(tmp_path / "theirs", base.cfg, base.params)
    assert m2.name == "pissa"
    assert np.abs(pu.our_logits(m2, base, p2, a2, tokens) - ours_logits).max() <= TOL
    hf_peft.save_merged(tmp_path / "merged", base.model, method, params, adapter)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(pu.hf_logits(merged, tokens) - ours_logits).max() <= TOL


def test_milora_init_is_the_minor_svd_and_exports_relative_to_the_original(base, base_logits, tmp_path):
    method = peft.get("milora", r=4, alpha=4)  # alpha = r: s = 1, as the MiLoRA code
    params, adapter0 = peft.init_adapter(method, KEY, base.params)
    assert "layers" in params and "layers" in adapter0  # stacked (scanned) layers
    base_layers = registry.unstack_layers(base.params)  # layer i at 'layers_i', as the paths below name it
    for path, mod, a in _modules(params, adapter0):
        kernel0 = np.asarray(base_layers[path[0]][path[1]][path[2]]["kernel"], np.float64)
        u, s, vh = np.linalg.svd(kernel0.T, full_matrices=False)  # torch layout [out, in], float64
        a_ref = (np.sqrt(s[-4:])[:, None] * vh[-4:])  # [r, in]
        b_ref = u[:, -4:] * np.sqrt(s[-4:])[None, :]  # [out, r]
        a_o, b_o = np.asarray(a["lora_a"]).T, np.asarray(a["lora_b"]).T
        sign = np.sign(np.sum(a_o * a_ref, axis=1))[:, None]
        assert np.abs(a_o * sign - a_ref).max() <= 1e-4 and np.abs(b_o * sign.T - b_ref).max() <= 1e-4
        residual = np.asarray(mod["kernel"], np.float64)
        assert np.abs(residual + np.asarray(a["lora_a"]) @ np.asarray(a["lora_b"]) - kernel0).max() <= 1e-5
    tokens = pu.inputs(1)[0]
    assert np.abs(pu.our_logits(method, base, params, adapter0, tokens) - base_logits).max() <= TOL

    adapter = pu.randomize(adapter0, seed=5, skip=("lora_a0", "lora_b0"))
    reference = registry.unstack_layers(registry._copy(adapter))
    for path, _, a in _modules(params, adapter):
        registry._set(reference, path, None, method.reference_adapter(a))
    reference = registry.stack_layers(reference)
    assert np.abs(pu.our_logits(method, base, params, reference, tokens) - base_logits).max() <= TOL
    ours = pu.our_logits(method, base, params, adapter, tokens)
    hf_peft.save_adapter(tmp_path / "ours", method, params, adapter)
    loaded = hf_peft_lib.PeftModel.from_pretrained(base.hf_model(), tmp_path / "ours").eval()
    assert np.abs(pu.hf_logits(loaded, tokens) - ours).max() <= TOL
    hf_peft.save_merged(tmp_path / "merged", base.model, method, params, adapter)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(pu.hf_logits(merged, tokens) - ours).max() <= TOL
    assert peft.trainable_count(method, adapter) == sum(
        a["lora_a"].size + a["lora_b"].size for _, _, a in _modules(params, adapter))


def test_pissa_randomized_svd_is_close_to_the_full_svd():
    rng = np.random.RandomState(0)
    w = (rng.standard_normal((96, 6)) * np.array([20, 15, 10, 8, 1, 0.5])) @ rng.standard_normal((6, 64))
    w = jnp.asarray(w + 0.01 * rng.standard_normal(w.shape), jnp.float32)  # [in, out], rank ~6
    full_k, full_a = peft.get("pissa", r=4, alpha=8).init(KEY, w)
    fast_k, fast_a = peft.get("pissa", r=4, alpha=8, niter=4).init(KEY, w)
    assert np.abs(np.asarray(fast_k - full_k)).max() <= 1e-3 * np.abs(np.asarray(w)).max()
    u, s, vh = svd_lowrank(KEY, w, 4, 4)
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(np.asarray(w), compute_uv=False)[:4], rtol=1e-3)


def test_lora_initialisation():
    kernel = jnp.zeros((96, 64))  # the tiny model's shapes, so the eager ops are already compiled
    _, a = peft.get("lora", r=4, alpha=8).init(KEY, kernel)
    assert a["lora_a"].shape == (96, 4) and a["lora_b"].shape == (4, 64)
    bound = 1 / np.sqrt(96)  # kaiming_uniform(a=sqrt(5)) on A [r, in]
    assert bound >= float(jnp.abs(a["lora_a"]).max()) > 0.95 * bound
    assert float(jnp.abs(a["lora_b"]).max()) == 0.0
    _, g = peft.get("lora", r=4, alpha=8, init_weights="gaussian").init(KEY, kernel)
    assert abs(float(jnp.std(g["lora_a"])) * 4 - 1) < 0.15
    assert peft.get("rslora", r=32, alpha=64).scaling == pytest.approx(64 / np.sqrt(32))
    assert peft.get("lora", r=32, alpha=64).scaling == 2.0
    w = jax.random.normal(KEY, (96, 64))
    _, d = peft.get("dora", r=4, alpha=8).init(KEY, w)
    np.testing.assert_allclose(np.asarray(d["magnitude"]), np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6)
    _, ada = peft.get("adalora", init_r=4).init(KEY, w)
    assert float(jnp.abs(ada["lora_e"]).max()) == 0.0 and abs(float(jnp.std(ada["lora_a"])) - 0.02) < 0.003


def test_dropout_uses_the_dropout_rng_and_dora_stays_a_noop(base, base_logits):
    tokens = jnp.asarray(pu.inputs(1)[0])
    for name in ("lora", "dora"):
        method = peft.get(name, r=4, alpha=8, dropout=0.5)
        params, adapter = peft.init_adapter(method, KEY, base.params)
        model = tfm.Transformer(base.cfg, peft=method)
        run = lambda a, k: model.apply({"params": params, "adapter": a}, tokens, rngs={"dropout": k})  # noqa: E731
        # B = 0: dropout cannot change the output (DoRA recomputes W0 x on the dropped input, c = 1).
        assert np.abs(np.asarray(run(adapter, KEY)) - base_logits).max() <= 1e-5
        adapter = pu.randomize(adapter, seed=1)
        det = np.asarray(model.apply({"params": params, "adapter": adapter}, tokens))
        nodrop = np.asarray(pu.our_logits(peft.get(name, r=4, alpha=8), base, params, adapter, np.asarray(tokens)))
        assert np.abs(det - nodrop).max() <= 1e-5  # no rng: deterministic
        a, b = np.asarray(run(adapter, jax.random.key(1))), np.asarray(run(adapter, jax.random.key(2)))
        assert np.abs(a - det).max() > 1e-3 and np.abs(a - b).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# AdaLoRA: rank allocator and orthogonality regulariser

def _to_hf_params(pm) -> dict:
    """PEFT saved-format name -> the live torch parameter."""
    return {n.replace(".default", ""): p for n, p in pm.named_parameters() if ".default" in n}


def test_adalora_rank_allocator_matches_peft(base):
    targets = ["q_proj", "v_proj", "up_proj"]
    kw = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=10)
    method = peft.get("adalora", alpha=8, target_modules=tuple(targets), **kw)
    params, adapter = peft.init_adapter(method, KEY, base.params)
    adapter = pu.randomize(adapter, seed=2)
    pm = pu.peft_model(base, hf_peft_lib.AdaLoraConfig(lora_alpha=8, target_modules=targets, **kw))
    pu.load_into_hf(pm, pu.to_hf_state(method, params, adapter))
    live = _to_hf_params(pm)
    state = method.init_state(adapter)
    on_step = jax.jit(method.on_step)
    kept = []
    for step in range(1, 13):
        grads = pu.randomize(jax.tree.map(jnp.zeros_like, adapter), seed=100 + step, scale=1.0)
        adapter = jax.tree.map(lambda p, g: p - 0.05 * g, adapter, grads)  # the optimizer step
        with torch.no_grad():
            for k, g in pu.to_hf_state(method, params, grads).items():
                live[k].grad = torch.tensor(g)
                live[k].sub_(0.05 * torch.tensor(g))
        pm.base_model.update_and_allocate(step)
        adapter, state = on_step(step, grads, adapter, state)
        ours = pu.to_hf_state(method, params, adapter)
        theirs = {k: p.detach().numpy() for k, p in live.items()}  # (the saved state dict drops masked ranks)
        e_keys = [k for k in ours if k.endswith("lora_E")]
        assert all(np.array_equal(ours[k] == 0, theirs[k] == 0) for k in e_keys), f"masks differ at step {step}"
        assert pu.max_abs_diff(ours, theirs) <= 1e-5
        kept.append(sum(int((ours[k] != 0).sum()) for k in e_keys))
    n = 2 * len(targets)
    assert kept[0] == 4 * n  # step 1 <= tinit: no masking
    assert kept[-1] == 2 * n and min(kept) == 2 * n  # the final budget, re-applied after T - tfinal
    assert len(set(kept)) > 2  # the cubic schedule pruned in between


def test_adalora_regulariser_and_its_gradient_match_peft(base):
    method = peft.get("adalora", init_r=4, target_r=2, alpha=8, total_step=10)
    params, adapter = peft.init_adapter(method, KEY, base.params)
    adapter = pu.randomize(adapter, seed=6)
    # task_type matters: a bare PeftModel's forward skips AdaLoraModel.forward, which adds the regulariser.
    pm = pu.peft_model(base, hf_peft_lib.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                                       target_modules=ALL7, task_type="CAUSAL_LM"))
    pu.load_into_hf(pm, pu.to_hf_state(method, params, adapter))
    tokens = pu.inputs(2)[0]
    model = tfm.Transformer(base.cfg, peft=method)

    def loss(a):  # next-token cross-entropy (HF's causal LM loss) + the orthogonality term
        logits = model.apply({"params": params, "adapter": a}, jnp.asarray(tokens))[:, :-1]
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(tokens)[:, 1:, None], -1))
        return ce + method.regularizer(a)

    value, grads = jax.value_and_grad(loss)(adapter)
    out = pm(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens))
    out.loss.backward()
    hf_grads = {k: p.grad.numpy() for k, p in _to_hf_params(pm).items() if p.grad is not None}
    d_grad = pu.max_abs_diff(pu.to_hf_state(method, params, grads), hf_grads)
    print(f"adalora with regulariser: |loss diff| {abs(float(value) - out.loss.item()):.2e}  grad {d_grad:.2e}")
    assert abs(float(value) - out.loss.item()) <= TOL and d_grad <= TOL
    assert float(method.regularizer(adapter)) > 0.1


# ---------------------------------------------------------------------------------------------
# optimizers

def _torch_grads(method, params, grads, live) -> None:
    for k, g in pu.to_hf_state(method, params, grads).items():
        if live[k].requires_grad:
            live[k].grad = torch.tensor(g)


@pytest.mark.parametrize("name", ["lorafa", "loraplus"])
def test_optimizer_matches_peft(base, name, monkeypatch):
    targets = ["q_proj", "down_proj"]
    method = peft.get(name, r=4, alpha=8, target_modules=tuple(targets))
    params, adapter = peft.init_adapter(method, KEY, base.params)
    adapter = pu.randomize(adapter, seed=8)
    pm = pu.peft_model(base, hf_peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    pu.load_into_hf(pm, pu.to_hf_state(method, params, adapter))
    if name == "lorafa":
        from peft.optimizers import create_lorafa_optimizer, lorafa

        monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)  # fp32 projection (CPU autocast off)
        opt = create_lorafa_optimizer(pm, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
        tx = optim.make_optimizer(method, adapter, 1e-2, weight_decay=0.1, eps=1e-6)
    else:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0, eps=1e-8)
        tx = optim.make_optimizer(method, adapter, 1e-2, loraplus_ratio=16.0)
    live = _to_hf_params(pm)
    state = tx.init(adapter)
    for step in range(3):
        grads = pu.randomize(jax.tree.map(jnp.zeros_like, adapter), seed=200 + step, scale=1.0)
        _torch_grads(method, params, grads, live)
        opt.step()
        updates, state = tx.update(grads, state, adapter)
        adapter = optax.apply_updates(adapter, updates)
    theirs = pu.hf_state_to_np(hf_peft_lib.get_peft_model_state_dict(pm))
    diff = pu.max_abs_diff(pu.to_hf_state(method, params, adapter), theirs)
    print(f"{name} optimizer: max|param diff| after 3 steps {diff:.2e}")
    assert diff <= 1e-5


def test_optimizer_groups_and_frozen_state():
    w = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.zeros((8, 16))}}}}
    lorafa = peft.get("lorafa", r=2, alpha=4)
    _, ad = peft.init_adapter(lorafa, KEY, w)
    assert peft.trainable_count(lorafa, ad) == 2 * 16
    tx = optim.make_optimizer(lorafa, ad, 1e-3)
    state = tx.init(ad)
    stored = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    assert stored == 2 * 2 * 16  # Adam moments for B only, none for the frozen A
    grads = jax.tree.map(jnp.ones_like, ad)
    updates, _ = tx.update(grads, state, ad)
    assert float(jnp.abs(updates["layers_0"]["mlp"]["up_proj"]["lora_a"]).max()) == 0.0
    labels = registry.labels(peft.get("loraplus", r=2, alpha=4), ad)
    assert labels["layers_0"]["mlp"]["up_proj"] == {"lora_a": "default", "lora_b": "lora_b"}
    sched = optax.linear_schedule(1e-3, 0.0, 10)
    plus = optim.make_optimizer(peft.get("loraplus", r=2, alpha=4), ad, sched, loraplus_ratio=4.0, grad_clip=1.0)
    updates, _ = plus.update(grads, plus.init(ad), ad)
    up = updates["layers_0"]["mlp"]["up_proj"]
    assert float(jnp.abs(up["lora_b"]).max()) == pytest.approx(4 * float(jnp.abs(up["lora_a"]).max()), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# counts, errors

R1_COUNTS = [
    ("lora", dict(r=32, alpha=64), 36_929_536),
    ("rslora", dict(r=32, alpha=64), 36_929_536),
    ("loraplus", dict(r=32, alpha=64), 36_929_536),
    ("lora", dict(r=1, alpha=2), 1_154_048),
    ("lorafa", dict(r=32, alpha=64), 20_643_840),
    ("dora", dict(r=32, alpha=64), 37_574_656),
    ("adalora", dict(init_r=32, target_r=8, alpha=64, total_step=1024), 36_935_808),
    ("pissa", dict(r=32, alpha=64, niter=4), 36_929_536),
    ("milora", dict(r=32, alpha=32), 36_929_536),
]


def test_trainable_counts_for_r1_distill_1p5b():
    shapes = nn.unbox(tfm.abstract_params(tfm.preset("r1-distill-qwen-1.5b")))  # no allocation
    for name, kw, expected in R1_COUNTS:
        method = peft.get(name, **kw)
        adapter = jax.eval_shape(lambda p: peft.init_adapter(method, jax.random.key(0), p)[1], shapes)
        assert peft.trainable_count(method, adapter) == expected, (name, kw)


def _hf_meta_count(hf_cfg, freeze_a: bool = False) -> int:
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
    with torch.device("meta"):
        pm = hf_peft_lib.get_peft_model(transformers.Qwen2ForCausalLM(cfg), hf_cfg)
    return sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and not (freeze_a and "lora_A" in n))


def test_counts_equal_hf_peft_on_the_meta_device():
    assert _hf_meta_count(hf_peft_lib.LoraConfig(r=32, lora_alpha=64, target_modules=ALL7)) == 36_929_536
    assert _hf_meta_count(hf_peft_lib.LoraConfig(r=32, lora_alpha=64, target_modules=ALL7), True) == 20_643_840
    assert _hf_meta_count(hf_peft_lib.LoraConfig(r=1, lora_alpha=2, target_modules=ALL7)) == 1_154_048
    assert _hf_meta_count(hf_peft_lib.LoraConfig(r=32, lora_alpha=64, use_dora=True,
                                                 target_modules=ALL7)) == 37_574_656
    assert _hf_meta_count(hf_peft_lib.AdaLoraConfig(init_r=32, lora_alpha=64, total_step=1024,
                                                    target_modules=ALL7)) == 36_935_808


def test_bad_hyperparameters_fail_clearly(base, tmp_path):
    for name, kw, match in [("lora", dict(r=0), "r must be a positive integer"),
                            ("dora", dict(r=-1), "r must be a positive integer"),
                            ("lora", dict(r=4, dropout=1.0), "dropout must be in"),
                            ("lora", dict(r=4, alpha=0), "alpha must be > 0"),
                            ("lora", dict(r=4, target_modules=()), "target_modules must be non-empty"),
                            ("pissa", dict(r=4, niter=-1), "niter must be None or an integer"),
                            ("adalora", dict(init_r=0), "init_r must be a positive integer"),
                            ("adalora", dict(total_step=10, tinit=8, tfinal=2), "tinit .* must be < total_step"),
                            ("lora", dict(rank=4), "bad hyperparameters")]:
        with pytest.raises(ValueError, match=match):
            peft.get(name, **kw)
    with pytest.raises(ValueError, match="matched no module"):
        peft.init_adapter(peft.get("lora", r=4, target_modules=("qq_proj",)), KEY, base.params)
    with pytest.raises(ValueError, match="exceeds min"):
        peft.init_adapter(peft.get("pissa", r=65), KEY, base.params)
    ada = peft.get("adalora", init_r=4)
    _, ad = peft.init_adapter(ada, KEY, base.params)
    with pytest.raises(ValueError, match="set total_step"):
        ada.on_step(1, ad, ad, ada.init_state(ad))
    with pytest.raises(ValueError, match="no Hugging Face PEFT format"):
        hf_peft.save_adapter(tmp_path / "x", PeftMethod(), base.params, {})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LOHA", "target_modules": ["q_proj"]}')
    lora = peft.get("lora", r=4)
    hf_peft.save_adapter(tmp_path / "ok", lora, *peft.init_adapter(lora, KEY, base.params))
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="peft_type 'LOHA' is not supported"):
        hf_peft.load_adapter(tmp_path / "bad", base.cfg, base.params)
    with pytest.raises(Exception, match="missing adapter_config.json"):
        hf_peft.load_adapter(tmp_path / "nowhere", base.cfg, base.params)


@pytest.mark.parametrize("name,kw", [(n, kw) for n, kw, _ in R1_COUNTS])
def test_adapter_axes_name_every_leaf(name, kw):
    method = peft.get(name, **kw)
    kernel = jax.ShapeDtypeStruct((128, 96), jnp.float32)
    _, adapter = jax.eval_shape(lambda k: method.init(jax.random.key(0), k), kernel)
    axes = method.adapter_axes(("embed", "mlp"), adapter)
    assert set(axes) == set(adapter)
    assert all(len(axes[k]) == len(adapter[k].shape) for k in adapter)
    assert all(ax in ("embed", "mlp", "rank") for k in axes for ax in axes[k])
