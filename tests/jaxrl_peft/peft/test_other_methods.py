"""MiSS, VeRA, IA3, LayerNorm tuning and full fine-tuning against Hugging Face PEFT (torch, CPU, fp32).

On a tiny random one-block Qwen2: the initial adapter state, no-op at init, logits and adapter gradients
with identical nonzero adapter weights, merged weights (ours and PEFT's merge_and_unload), export to /
import from the PEFT format, merged export, and trainable-parameter counts for the R1-Distill-Qwen-1.5B
shape (abstract shapes on our side, a meta-device model on HF's).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peft_utils as pu
from peft_utils import hf_peft_lib, torch, transformers

from jaxrl_peft import peft
from jaxrl_peft.models import hf, transformer as tfm
from jaxrl_peft.models import hf_peft
from jaxrl_peft.peft import registry
from jaxrl_peft.peft import vera as vera_lib
from jaxrl_peft.peft.base import ALL_LINEAR

TOL = 1e-4
ALL7 = list(ALL_LINEAR)
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pu.make_base(tmp_path_factory.mktemp("tiny_qwen2"), num_hidden_layers=1)


# ---------------------------------------------------------------------------------------------
# our side, compiled once per method (the inputs are host arrays so every call reuses the compilation)

def _host(tree):
    return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def _loss_and_grad(cfg, method):
    model = tfm.Transformer(cfg, peft=method)

    def loss(adapter, params, tokens, weights):
        logits = model.apply({"params": params, "adapter": adapter}, tokens)
        return jnp.sum(logits * weights), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.lru_cache(maxsize=None)
def _plain_forward(cfg):
    return jax.jit(lambda params, tokens: tfm.Transformer(cfg).apply({"params": params}, tokens))


def ours(base, method, params, adapter, tokens, weights):
    """Our logits and the gradient of sum(logits * weights) with respect to the adapter."""
    (_, logits), grads = _loss_and_grad(base.cfg, method)(_host(adapter), _host(params), tokens, weights)
    return np.asarray(logits), grads


def plain(base, params, tokens) -> np.ndarray:
    """Logits without adapter (base or merged weights)."""
    return np.asarray(_plain_forward(base.cfg)(_host(params), tokens))


def merged(method, params, adapter) -> dict:
    return jax.jit(functools.partial(peft.merge, method))(_host(params), _host(adapter))


def perturb(method, adapter: dict, seed: int, scale: float) -> dict:
    """Trainable leaves plus scale * N(0, 1) noise (frozen ones kept), so nothing passes on a no-op."""
    frozen = jax.tree.map(lambda label: label == "frozen", peft.labels(method, adapter))
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda leaf, fz: leaf if fz else
                        np.asarray(leaf) + scale * rng.standard_normal(leaf.shape).astype(np.float32),
                        adapter, frozen)


def trainable_only(state: dict) -> dict:
    """Drops model-level entries (VeRA's shared projections: buffers, no gradient)."""
    return {k: v for k, v in state.items() if k.count(".") > 1}


def _leaf(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


# ---------------------------------------------------------------------------------------------
# PEFT methods against HF PEFT

# name -> (our method and hyperparameters, HF PEFT config, perturbation scale)
CASES = {
    # r=24 does not divide the input sizes 64: exercises the zero padding of the chunked input.
    "miss": (dict(name="miss", r=24), lambda: hf_peft_lib.MissConfig(r=24, target_modules=ALL7), 0.05),
    "miss_mini": (dict(name="miss", r=8, variant="mini", mini_r=16),
                  lambda: hf_peft_lib.MissConfig(r=8, init_weights="mini", mini_r=16, target_modules=ALL7), 0.05),
    "miss_bat": (dict(name="miss", r=16, variant="bat"),
                 lambda: hf_peft_lib.MissConfig(r=16, init_weights="bat", target_modules=ALL7), 0.05),
    "vera": (dict(name="vera", r=8, projection_prng_key=3),
             lambda: hf_peft_lib.VeraConfig(r=8, projection_prng_key=3, target_modules=ALL7), 0.5),
    # The paper's k, v and down (input-scaled), plus o (no bias) and up (input-scaled too).
    "ia3": (dict(name="ia3", target_modules=("k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                 feedforward_modules=("up_proj", "down_proj")),
            lambda: hf_peft_lib.IA3Config(target_modules=["k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                                          feedforward_modules=["up_proj", "down_proj"]), 0.3),
    "ln_tuning": (dict(name="ln_tuning"), lambda: hf_peft_lib.LNTuningConfig(
        target_modules=["input_layernorm", "post_attention_layernorm", "norm"]), 0.3),
}


def _method(base, kw):
    kw = dict(kw)
    return peft.get(kw.pop("name"), **kw).prepare(base.params)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_and_round_trips(base, case, tmp_path):
    kw, hf_cfg, scale = CASES[case]
    method = _method(base, kw)
    params, adapter = peft.init_adapter(method, KEY, base.params)
    pm = pu.peft_model(base, hf_cfg())
    tokens, weights = pu.inputs(1)

    # Same initial state as PEFT (keys, shapes, values; VeRA's shared projections included), and a no-op.
    init_ours = pu.to_hf_state(method, params, adapter)
    init_theirs = pu.hf_state_to_np(hf_peft_lib.get_peft_model_state_dict(pm))
    assert sorted(init_ours) == sorted(init_theirs)
    assert pu.max_abs_diff(init_ours, init_theirs) == 0.0
    base_logits = plain(base, base.params, tokens)
    assert np.abs(ours(base, method, params, adapter, tokens, weights)[0] - base_logits).max() <= 1e-5

    # Identical nonzero weights: logits and adapter gradients.
    adapter = perturb(method, adapter, seed=7, scale=scale)
    pu.load_into_hf(pm, pu.to_hf_state(method, params, adapter))
    logits, grads = ours(base, method, params, adapter, tokens, weights)
    ref_logits, ref_grads = pu.hf_logits_and_grads(pm, tokens, weights)
    our_grads = trainable_only(pu.to_hf_state(method, params, grads))
    assert np.abs(logits - base_logits).max() > 1e-2, "the perturbed adapter must change the output"
    assert sorted(our_grads) == sorted(trainable_only(ref_grads))
    assert min(float(np.abs(g).max()) for g in our_grads.values()) > 0
    d_logits, d_grads = float(np.abs(logits - ref_logits).max()), pu.max_abs_diff(our_grads, ref_grads)
    print(f"{case}: max|logits diff| {d_logits:.2e}  max|grad diff| {d_grads:.2e}")
    assert d_logits <= TOL and d_grads <= TOL

    # Export: PEFT loads ours; we load PEFT's (other random weights); merged checkpoints load in transformers.
    hf_peft.save_adapter(tmp_path / "ours", method, params, adapter, base_model_name_or_path=str(base.path))
    loaded = hf_peft_lib.PeftModel.from_pretrained(base.hf_model(), tmp_path / "ours").eval()
    assert np.abs(pu.hf_logits(loaded, tokens) - logits).max() <= TOL
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "theirs")
    method2, params2, adapter2 = hf_peft.load_adapter(tmp_path / "theirs", base.cfg, base.params)
    assert method2.name == method.name and method2.hf_config() == method.hf_config()
    assert sorted(method2.target_modules) == sorted(method.target_modules)
    theirs_logits = pu.hf_logits(pm, tokens)
    # `method` equals `method2` up to the order of its targets, and reuses the compiled step.
    assert np.abs(ours(base, method, params2, adapter2, tokens, weights)[0] - theirs_logits).max() <= TOL

    # Merging: our merged weights equal PEFT's merge_and_unload and load in transformers.
    ours_merged = merged(method, params2, adapter2)
    assert np.abs(plain(base, ours_merged, tokens) - theirs_logits).max() <= TOL
    hf_merged = pu.hf_state_to_np(pm.merge_and_unload().state_dict())
    assert "layers" in ours_merged  # stacked layers, compared layer by layer under the unrolled paths
    merged_layers = registry.unstack_layers(ours_merged)
    for path, _, mod in registry.modules(base.params):
        for leaf in mod:
            name, transpose = hf.hf_name(path + (leaf,))
            w = np.asarray(_leaf(merged_layers, path + (leaf,)))
            np.testing.assert_allclose(w.T if transpose else w, hf_merged[name], atol=1e-5, rtol=0)
    hf_peft.save_merged(tmp_path / "merged", base.model, method2, params2, adapter2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(pu.hf_logits(reloaded, tokens) - theirs_logits).max() <= TOL


def test_vera_without_saved_projections_regenerates_them(base, tmp_path):
    """save_projection=False: both sides rebuild the projections from the seed; PEFT loads ours."""
    method = peft.get("vera", r=4, save_projection=False).prepare(base.params)
    params, adapter = peft.init_adapter(method, KEY, base.params)
    adapter = perturb(method, adapter, seed=2, scale=0.5)
    tokens, weights = pu.inputs(2)
    logits = ours(base, method, params, adapter, tokens, weights)[0]
    state = pu.to_hf_state(method, params, adapter)
    assert not [k for k in state if "vera_A" in k or "vera_B" in k]
    hf_peft.save_adapter(tmp_path / "ours", method, params, adapter)
    loaded = hf_peft_lib.PeftModel.from_pretrained(base.hf_model(), tmp_path / "ours").eval()
    assert np.abs(pu.hf_logits(loaded, tokens) - logits).max() <= TOL
    method2, params2, adapter2 = hf_peft.load_adapter(tmp_path / "ours", base.cfg, base.params)
    assert np.abs(ours(base, method2, params2, adapter2, tokens, weights)[0] - logits).max() <= TOL


def test_full_finetuning_matches_transformers(base, tmp_path):
    """Full FT trains copies of every linear and norm weight: gradients equal a fully trainable HF model's."""
    method = peft.get("full").prepare(base.params)
    params, adapter = peft.init_adapter(method, KEY, base.params)
    tokens, weights = pu.inputs(1)
    base_logits = plain(base, base.params, tokens)
    assert np.abs(ours(base, method, params, adapter, tokens, weights)[0] - base_logits).max() <= 1e-5

    adapter = perturb(method, adapter, seed=3, scale=0.02)
    assert "layers" in adapter  # stacked; HF names are per layer
    flat = {hf.hf_name(tuple(k.key for k in kp)) : np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(registry.unstack_layers(adapter))[0]}
    assert len(flat) == (7 + 3 + 2) + 3  # the block's kernels, q/k/v biases, norms; final norm, lm_head, embed
    ref = base.hf_model()
    state = ref.state_dict()
    with torch.no_grad():
        for (name, transpose), v in flat.items():
            state[name].copy_(torch.tensor(v.T if transpose else v))
    logits, grads = ours(base, method, params, adapter, tokens, weights)
    ref.zero_grad(set_to_none=True)
    ref_logits = ref(torch.tensor(tokens)).logits
    (ref_logits * torch.tensor(weights)).sum().backward()
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters() if p.requires_grad}
    our_grads = {}
    for kp, g in jax.tree_util.tree_flatten_with_path(registry.unstack_layers(grads))[0]:
        name, transpose = hf.hf_name(tuple(k.key for k in kp))
        our_grads[name] = np.asarray(g).T if transpose else np.asarray(g)
    assert sorted(our_grads) == sorted(ref_grads)
    d_logits = float(np.abs(logits - ref_logits.detach().numpy()).max())
    d_grads = pu.max_abs_diff(our_grads, ref_grads)
    print(f"full: max|logits diff| {d_logits:.2e}  max|grad diff| {d_grads:.2e}")
    assert d_logits <= TOL and d_grads <= TOL

    assert method.hf_config() is None
    with pytest.raises(ValueError, match="save_merged"):
        hf_peft.save_adapter(tmp_path / "x", method, params, adapter)
    hf_peft.save_merged(tmp_path / "merged", base.model, method, params, adapter)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(pu.hf_logits(reloaded, tokens) - logits).max() <= TOL


# ---------------------------------------------------------------------------------------------
# trainable-parameter counts for the R1-Distill-Qwen-1.5B shape

@functools.lru_cache(maxsize=1)
def _abstract_1p5b():
    return nn.unbox(tfm.abstract_params(tfm.preset("r1-distill-qwen-1.5b")))


def _our_count(method) -> int:
    abstract = _abstract_1p5b()
    method = method.prepare(abstract)
    adapter = jax.eval_shape(lambda p: peft.init_adapter(method, KEY, p)[1], abstract)
    return peft.trainable_count(method, adapter)


def _hf_count(hf_cfg) -> int:
    """HF PEFT's trainable count on the 1.5B shape, built on the meta device (nothing allocated)."""
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                   tie_word_embeddings=False)
    with torch.device("meta"):
        pm = hf_peft_lib.get_peft_model(transformers.Qwen2ForCausalLM(cfg), hf_cfg)
    return pm.get_nb_trainable_parameters()[0]


COUNTS = [
    # (ours, HF PEFT config, the study's number or None): PEFT's qwen2-default targets, as the study ran them ...
    (dict(name="miss", r=64, target_modules=("q_proj", "v_proj")), lambda: hf_peft_lib.MissConfig(r=64), 3_211_264),
    (dict(name="vera", r=32, target_modules=("q_proj", "v_proj")), lambda: hf_peft_lib.VeraConfig(r=32), 51_968),
    (dict(name="ln_tuning", target_modules=("post_attention_layernorm",)), hf_peft_lib.LNTuningConfig, 43_008),
    (dict(name="ia3", target_modules=("q_proj", "v_proj", "down_proj")), hf_peft_lib.IA3Config, 301_056),
    # ... and our configurations: all seven projections; IA3 on k, v, down; every norm.
    (dict(name="miss", r=64), lambda: hf_peft_lib.MissConfig(r=64, target_modules=ALL7), 41_287_680),
    (dict(name="miss", r=64, variant="bat"),
     lambda: hf_peft_lib.MissConfig(r=64, init_weights="bat", target_modules=ALL7), None),
    (dict(name="miss", r=64, variant="mini", mini_r=64),
     lambda: hf_peft_lib.MissConfig(r=64, init_weights="mini", mini_r=64, target_modules=ALL7), None),
    (dict(name="vera", r=32), lambda: hf_peft_lib.VeraConfig(r=32, target_modules=ALL7), 651_392),
    (dict(name="ia3"), lambda: hf_peft_lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]), 265_216),
    (dict(name="ln_tuning"), lambda: hf_peft_lib.LNTuningConfig(
        target_modules=["input_layernorm", "post_attention_layernorm", "norm"]), 87_552),
]


@pytest.mark.parametrize("kw,hf_cfg,expected", COUNTS)
def test_trainable_count_matches_peft(kw, hf_cfg, expected):
    kw = dict(kw)
    count = _our_count(peft.get(kw.pop("name"), **kw))
    assert count == _hf_count(hf_cfg())
    if expected is not None:
        assert count == expected


def test_full_count_is_every_parameter():
    """Full FT trains every weight (embedding and lm_head included): the study's 1,777,088,000."""
    cfg = tfm.preset("r1-distill-qwen-1.5b")
    assert cfg.num_params == 1_777_088_000
    assert _our_count(peft.get("full")) == cfg.num_params


# ---------------------------------------------------------------------------------------------
# method-specific checks

def test_vera_projections_are_bit_exact_with_torch():
    from peft.tuners.vera.model import _kaiming_init
    a, b = vera_lib.projections(0, 32, 8960, 1536)
    g = torch.Generator(device="cpu").manual_seed(0)
    np.testing.assert_array_equal(a, _kaiming_init((32, 1536), generator=g).numpy())
    np.testing.assert_array_equal(b, _kaiming_init((8960, 32), generator=g).numpy())


def test_vera_needs_its_projection_shape_and_freezes_the_projections(base):
    method = peft.get("vera", r=4)
    with pytest.raises(ValueError, match="prepare"):
        peft.init_adapter(method, KEY, base.params)
    method = method.prepare(base.params)
    assert method.projection_shape == (96, 96)  # (largest out: gate/up, largest in: down)
    _, adapter = peft.init_adapter(method, KEY, base.params)
    assert peft.labels(method, adapter)["layers"]["self_attn"]["q_proj"] == {
        "A": "frozen", "B": "frozen", "lambda_b": "default", "lambda_d": "default"}
    assert peft.trainable_count(method, adapter) == 4 * 7 + (64 + 32 + 32 + 64 + 96 + 96 + 64)


@pytest.mark.parametrize("kw,match", [
    (dict(r=12, variant="bat"), "divide both dimensions"),
    (dict(r=8, variant="mini", mini_r=7), "mini_r=7 must divide"),
    (dict(r=200), "exceeds the input size"),
    (dict(variant="bone"), "variant must be one of"),
])
def test_miss_rejects_bad_hyperparameters(base, kw, match):
    with pytest.raises(ValueError, match=match):
        peft.init_adapter(peft.get("miss", **kw), KEY, base.params)


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(ValueError, match="feedforward_modules"):
        peft.get("ia3", target_modules=("k_proj",), feedforward_modules=("down_proj",))


def test_hf_configs_round_trip():
    for method in [peft.get("miss", r=16, variant="mini", mini_r=4), peft.get("miss", r=8, variant="bat"),
                   peft.get("vera", r=16, projection_prng_key=5, d_initial=0.2, save_projection=False),
                   peft.get("ia3"), peft.get("ln_tuning"),
                   peft.get("ia3", target_modules=("k_proj", "down_proj"),
                            feedforward_modules=("layers_0/mlp/down_proj",))]:
        back = type(method).from_hf_config(method.hf_config(), target_modules=method.target_modules)
        assert dataclasses.replace(back) == method
    assert peft.get("ia3", feedforward_modules=("layers_0/mlp/down_proj", "down_proj"),
                    ).hf_config()["feedforward_modules"] == ["down_proj", "layers.0.mlp.down_proj"]
