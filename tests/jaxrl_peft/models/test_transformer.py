"""Parity of the R1-Distill decoder and HF I/O with transformers (torch, CPU, fp32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrl_peft.infra import mesh as mesh_lib  # noqa: E402
from jaxrl_peft.models import hf, safetensors_io, transformer as tfm  # noqa: E402

VOCAB = 128


def _randomize(model, seed: int):
    """Every tensor random (biases and norm gains too), so parity cannot hide a missing term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "norm" in name else 0.08
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return model.eval()


def make_hf(kind: str, tie: bool = False, seed: int = 0):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(rope_theta=10000.0, rms_norm_eps=1e-6, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}, **common)
        model = transformers.LlamaForCausalLM(cfg)
    return _randomize(model, seed)


def hf_logits(model, tokens, mask=None):
    tokens = torch.tensor(np.asarray(tokens))
    kw = {}
    if mask is not None:
        m = torch.tensor(np.asarray(mask), dtype=torch.long)
        kw = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(tokens, **kw).logits.float().numpy()


CASES = [("qwen2", False, None), ("qwen2", True, None), ("llama", False, None), ("qwen2", False, "3KB"),
         ("llama", False, "20KB")]


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("kind,tie,shard", CASES)
def test_logits_match_transformers(tmp_path, kind, tie, shard, scan):
    ref = make_hf(kind, tie)
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model, params = hf.load(tmp_path, dtype=jnp.float32, scan_layers=scan)
    assert ("layers" in params) == scan and ("layers_1" in params) == (not scan)
    assert model.cfg.arch == kind and model.cfg.tie_embeddings == tie
    tokens = np.random.RandomState(1).randint(0, VOCAB, (2, 40))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    diff = np.abs(ours - hf_logits(ref, tokens)).max()
    assert diff <= 1e-4, diff


def test_left_padding_matches_transformers(tmp_path):
    ref = make_hf("qwen2")
    ref.save_pretrained(tmp_path)
    model, params = hf.load(tmp_path, dtype=jnp.float32)
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, VOCAB, (3, 12))
    mask = np.ones_like(tokens)
    mask[0, :5] = 0
    mask[2, :1] = 0
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    theirs = hf_logits(ref, tokens, mask)
    m = mask.astype(bool)
    assert np.abs(ours[m] - theirs[m]).max() <= 1e-4
    # A left-padded row equals the same prompt alone.
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(tokens[:1, 5:])))
    assert np.abs(alone[0] - ours[0, 5:]).max() <= 1e-5


def test_segments_isolate_packed_sequences():
    cfg = tfm.preset("tiny", dtype="float32")
    params = tfm.init_params(cfg, jax.random.key(0))
    model = tfm.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.vocab_size)
    seg = jnp.array([[1] * 4 + [2] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))])
    packed = model.apply({"params": params}, tokens, positions=pos, segment_ids=seg)
    a = model.apply({"params": params}, tokens[:, :4])
    b = model.apply({"params": params}, tokens[:, 4:])
    np.testing.assert_allclose(packed, jnp.concatenate([a, b], axis=1), atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_equals_full_forward(scan):
    cfg = tfm.preset("tiny", dtype="float32", scan_layers=scan)
    params = tfm.init_params(cfg, jax.random.key(0))
    model = tfm.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    mask = jnp.ones((2, 12), bool).at[1, :3].set(False)
    full = model.apply({"params": params}, tokens, attention_mask=mask)
    cache = tfm.init_cache(cfg, 2, 16)
    kv_mask = jnp.concatenate([mask[:, :7], jnp.ones((2, 9), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.apply({"params": params}, tokens[:, :7], positions=positions[:, :7],
                                cache=cache, cache_index=0, kv_mask=kv_mask)
    steps = [logits]
    for i in range(7, 12):
        logits, cache = model.apply({"params": params}, tokens[:, i:i + 1], positions=positions[:, i:i + 1],
                                    cache=cache, cache_index=i, kv_mask=kv_mask)
        steps.append(logits)
    stepped = jnp.concatenate(steps, axis=1)
    valid = np.asarray(mask)
    assert np.abs(np.asarray(stepped)[valid] - np.asarray(full)[valid]).max() <= 1e-5


def test_save_loads_in_transformers(tmp_path):
    cfg = tfm.preset("tiny", dtype="float32", vocab_size=VOCAB)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                          tfm.init_params(cfg, jax.random.key(0)))
    model = tfm.Transformer(cfg)
    hf.save(tmp_path / "one", model, params)
    hf.save(tmp_path / "many", model, params, max_shard_bytes=20_000)
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    for sub in ("one", "many"):
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / sub, dtype=torch.float32).eval()
        assert np.abs(hf_logits(ref, tokens) - ours).max() <= 1e-4
    # bf16 round trip through our own loader.
    hf.save(tmp_path / "bf16", model, params, dtype=jnp.bfloat16)
    _, p16 = hf.load(tmp_path / "bf16", dtype=jnp.bfloat16)
    q16 = p16["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q16.dtype == jnp.bfloat16 and q16.shape == (cfg.num_layers, cfg.hidden_size, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(q16, np.float32),
                               np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"]), atol=4e-3)


def test_bad_checkpoints_fail_clearly(tmp_path):
    ref = make_hf("qwen2")
    ref.save_pretrained(tmp_path)
    st = safetensors_io.SafetensorsFile(tmp_path / "model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    safetensors_io.save_safetensors(tmp_path / "model.safetensors", missing)
    with pytest.raises(hf.CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        hf.load(tmp_path)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    safetensors_io.save_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn"
                                                 r"\.k_proj\.weight' has shape \(3, 64\), expected \(32, 64\)"):
        hf.load(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["architectures"] = ["MistralForCausalLM"]
    conf["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(hf.CheckpointError, match="config.json: unsupported architecture"):
        hf.load(tmp_path)
    with pytest.raises(hf.CheckpointError, match="missing config.json"):
        hf.load(tmp_path / "nowhere")


def test_sharded_forward_equals_single_device():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 simulated CPU devices"
    cfg = tfm.preset("tiny", dtype="float32")
    params = tfm.init_params(cfg, jax.random.key(0))
    model = tfm.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    single = model.apply({"params": params}, tokens)
    for shape in [(2, 2, 2), (1, 8, 1), (1, 4, 2)]:
        mesh = mesh_lib.make_mesh(*shape)
        sharded = tfm.shard_params(params, cfg, mesh)
        assert len(sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
        out = jax.jit(model.apply)({"params": sharded},
                                   jax.device_put(tokens, mesh_lib.batch_sharding(mesh, 2)))
        np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5)


def test_presets_have_the_public_shapes():
    assert tfm.preset("r1-distill-qwen-1.5b").num_params == 1_777_088_000
    assert tfm.preset("r1-distill-qwen-7b").num_params == 7_615_616_512
    assert tfm.preset("r1-distill-llama-8b").num_params == 8_030_261_248
    hf_cfg = hf.config_to_hf(tfm.preset("r1-distill-llama-70b"))
    assert hf.config_from_hf(hf_cfg) == tfm.preset("r1-distill-llama-70b")


def test_token_logprobs_equal_full_log_softmax():
    cfg = tfm.preset("tiny", dtype="float32")
    params = tfm.init_params(cfg, jax.random.key(0))
    model = tfm.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    logp_full = jax.nn.log_softmax(model.apply({"params": params}, tokens)[:, :-1])
    want = jnp.take_along_axis(logp_full, tokens[:, 1:, None], -1)[..., 0]
    got, ent = tfm.token_logprobs(model, {"params": params}, tokens, chunk=5, with_entropy=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(logp_full) * logp_full, -1), atol=1e-4)
    # Gradients through the chunked, rematerialised head equal those of the plain loss.
    g1 = jax.grad(lambda p: tfm.token_logprobs(model, {"params": p}, tokens, chunk=4)[0].sum())(params)
    g2 = jax.grad(lambda p: jnp.take_along_axis(jax.nn.log_softmax(model.apply({"params": p}, tokens)[:, :-1]),
                                                tokens[:, 1:, None], -1).sum())(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5)
