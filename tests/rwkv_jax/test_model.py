"""RWKV-7 model: parity with the official rwkv package (x070, cpu fp32) on a tiny random checkpoint,
recurrent == parallel, generation through the shared sampler, checkpoint loading/conversion and their
errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from jax.sharding import PartitionSpec as P

from rwkv_jax import model as rwkv_model
from jaxrl_peft.rl import rollout
from rwkv_jax.model import RWKV7, RWKV7Config, RWKV7State, init_state, load

torch = pytest.importorskip("torch")

V, C, H, N, L, F = 256, 128, 2, 64, 2, 512
DW, DA, DV, DG = 32, 32, 16, 32
T = 24
TOL = 1e-4


def random_checkpoint(seed: int = 0) -> dict:
    """Official x070 tensor names and shapes, random values at sensible scales (fp32)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, s=1.0: rng.normal(0.0, s, shape)  # noqa: E731
    uniform = lambda *shape, lo=0.0, hi=1.0: rng.uniform(lo, hi, shape)  # noqa: E731
    sd = {"emb.weight": normal(V, C), "head.weight": normal(V, C, s=C ** -0.5),
          "ln_out.weight": 1 + normal(C, s=0.1), "ln_out.bias": normal(C, s=0.1),
          "blocks.0.ln0.weight": 1 + normal(C, s=0.1), "blocks.0.ln0.bias": normal(C, s=0.1)}
    for i in range(L):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2", "att.ln_x"):
            sd[p + n + ".weight"] = 1 + normal(C, s=0.1)
            sd[p + n + ".bias"] = normal(C, s=0.1)
        for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[p + "att." + n] = uniform(1, 1, C)
        sd[p + "att.w0"] = uniform(1, 1, C, lo=-3.0, hi=1.0)
        sd[p + "att.a0"] = uniform(1, 1, C, lo=-1.0, hi=1.0)
        sd[p + "att.v0"] = uniform(1, 1, C, lo=-1.0, hi=1.0)
        for n, D in (("w", DW), ("a", DA), ("v", DV), ("g", DG)):
            sd[f"{p}att.{n}1"] = normal(C, D, s=C ** -0.5)
            sd[f"{p}att.{n}2"] = normal(D, C, s=0.5 * D ** -0.5)
        sd[p + "att.k_k"] = 0.7 + normal(1, 1, C, s=0.1)
        sd[p + "att.k_a"] = 1.0 + normal(1, 1, C, s=0.1)
        sd[p + "att.r_k"] = normal(H, N, s=0.3)
        for n in ("receptance", "key", "value", "output"):
            sd[f"{p}att.{n}.weight"] = normal(C, C, s=C ** -0.5)
        sd[p + "ffn.x_k"] = uniform(1, 1, C)
        sd[p + "ffn.key.weight"] = normal(F, C, s=C ** -0.5)
        sd[p + "ffn.value.weight"] = normal(C, F, s=0.5 * F ** -0.5)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("rwkv7") / "tiny.pth"
    torch.save(random_checkpoint(), path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load(ckpt)


@pytest.fixture(scope="module")
def official(ckpt):
    """The rwkv package's RWKV_x070 on CPU in fp32 with the pure-torch per-step WKV."""
    os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    rwkv_pkg_model = pytest.importorskip("rwkv.model")
    if not hasattr(rwkv_pkg_model, "RWKV_x070"):
        pytest.skip("rwkv.model was imported before RWKV_V7_ON=1 was set")
    return rwkv_pkg_model.RWKV(model=ckpt[:-len(".pth")], strategy="cpu fp32")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(1, V, (2, T)).astype(np.int32)


@pytest.fixture(scope="module")
def apply_p(loaded):
    """Jitted apply taking the params, so every test with these shapes reuses one compilation."""
    model, _ = loaded
    fn = jax.jit(lambda params, toks, state, recurrent: model.apply(
        {"params": params}, toks, state, recurrent=recurrent), static_argnums=3)

    def apply_p(params, toks, state, recurrent):
        state = init_state(model.config, toks.shape[0]) if state is None else state
        return fn(params, toks, state, recurrent)
    return apply_p


@pytest.fixture(scope="module")
def apply(loaded, apply_p):
    _, params = loaded
    return lambda toks, state, recurrent: apply_p(params, toks, state, recurrent)


def run_recurrent(apply, toks, state=None):
    """Feeds tokens one at a time; returns (logits [B, T, V], state)."""
    out = []
    for t in range(toks.shape[1]):
        logits, state = apply(toks[:, t:t + 1], state, True)
        out.append(logits)
    return jnp.concatenate(out, axis=1), state


def official_state_as_ours(state) -> list[np.ndarray]:
    """The official per-layer [att_x_prev, wkv [H, V, K], ffn_x_prev] in our [L, ...] layout."""
    return [np.stack([state[3 * i].numpy() for i in range(L)]),
            np.stack([state[3 * i + 1].numpy().transpose(0, 2, 1) for i in range(L)]),
            np.stack([state[3 * i + 2].numpy() for i in range(L)])]


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_detected_config(loaded):
    model, _ = loaded
    assert model.config.arch_dict() == dict(vocab_size=V, n_embd=C, n_layer=L, head_size=N,
                                            dim_ffn=F, decay_lora=DW, iclr_lora=DA, value_lora=DV,
                                            gate_lora=DG)


def test_parallel_matches_official(official, apply, tokens):
    logits, state = apply(tokens, None, False)
    for b in range(tokens.shape[0]):
        ref, ref_state = official.forward(tokens[b].tolist(), None, full_output=True)
        d = max_diff(logits[b], ref.numpy())
        print(f"parallel vs official, sequence {b}: max |dlogits| = {d:.2e}")
        assert d <= TOL
        for ours, theirs in zip(state, official_state_as_ours(ref_state)):
            assert max_diff(ours[:, b], theirs) <= TOL


def test_recurrent_matches_official(official, apply, tokens):
    logits, _ = run_recurrent(apply, tokens)
    for b in range(tokens.shape[0]):
        state = None
        worst = 0.0
        for t in range(T):
            ref, state = official.forward([int(tokens[b, t])], state)
            worst = max(worst, max_diff(logits[b, t], ref.numpy()))
        print(f"recurrent vs official, sequence {b}: max |dlogits| = {worst:.2e}")
        assert worst <= TOL


def test_recurrent_equals_parallel_and_prefill_continues(apply, tokens):
    par, par_state = apply(tokens, None, False)
    rec, rec_state = run_recurrent(apply, tokens)
    print(f"recurrent vs parallel: max |dlogits| = {max_diff(par, rec):.2e}")
    assert max_diff(par, rec) <= TOL
    for a, b in zip(par_state, rec_state):
        assert max_diff(a, b) <= TOL
    # Prefill part of the sequence, then continue in either mode from the returned state.
    cut = T // 2
    _, prefill_state = apply(tokens[:, :cut], None, False)
    rest_par, _ = apply(tokens[:, cut:], prefill_state, False)
    rest_rec, _ = run_recurrent(apply, tokens[:, cut:], prefill_state)
    assert max_diff(rest_par, par[:, cut:]) <= TOL
    assert max_diff(rest_rec, par[:, cut:]) <= TOL


def generate(model, params, prompt, max_new_tokens, temperature=0.0, top_p=1.0, key=None):
    """The shared sampler on unpadded prompts: (new tokens [B, N], state after the last new token)."""
    sampling = rollout.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    sampler = rollout.Sampler(model, sampling, pad_id=0)
    prompt = np.asarray(prompt)
    key = jax.random.key(0) if key is None else key
    out, state = sampler({"params": params}, prompt, np.ones(prompt.shape, bool), key, return_state=True)
    return out.tokens, state


def test_greedy_generation_matches_parallel(loaded, apply, tokens):
    model, params = loaded
    n_prompt = n_new = T // 2
    new, state = generate(model, params, tokens[:, :n_prompt], n_new)
    assert new.shape == (2, n_new) and new.dtype == jnp.int32
    # Parallel-mode greedy decoding on a fixed [B, T] buffer (causal: later slots do not matter).
    seq = np.array(tokens)
    seq[:, n_prompt:] = 0
    for t in range(n_prompt, T):
        logits, full_state = apply(seq, None, False)
        seq[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], -1))
    np.testing.assert_array_equal(np.asarray(new), seq[:, n_prompt:])
    # The returned state is the state after the last generated token.
    _, full_state = apply(seq, None, False)
    for a, b in zip(state, full_state):
        assert max_diff(a, b) <= TOL


def test_sampling_generation(loaded, tokens):
    model, params = loaded
    kw = dict(temperature=1.0, top_p=0.5)
    prompt = tokens[:, :T // 2]  # same shapes as the greedy test: no new compilation
    a, _ = generate(model, params, prompt, T // 2, key=jax.random.key(3), **kw)
    b, _ = generate(model, params, prompt, T // 2, key=jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (2, T // 2) and int(a.min()) >= 0 and int(a.max()) < V
    c, _ = generate(model, params, prompt, T // 2, key=jax.random.key(4), **kw)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_safetensors_conversion(ckpt, loaded, apply_p, tokens, tmp_path):
    model, params = loaded
    dst = tmp_path / "converted"
    cfg = rwkv_model.convert_pth_to_safetensors(ckpt, str(dst))
    assert json.loads((dst / "config.json").read_text())["n_layer"] == cfg.n_layer == L
    model2, params2 = load(str(dst))
    assert model2.config == model.config
    a, _ = apply_p(params, tokens, None, False)
    b, _ = apply_p(params2, tokens, None, False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_checkpoint(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in random_checkpoint(seed=2).items()}
    torch.save(sd, tmp_path / "bf16.pth")
    rwkv_model.convert_pth_to_safetensors(str(tmp_path / "bf16.pth"), str(tmp_path / "st"))
    for path in (tmp_path / "bf16.pth", tmp_path / "st"):
        _, params = load(str(path), dtype=jnp.float32, compute_dtype=jnp.bfloat16)
        want = sd["blocks.1.att.key.weight"].float().numpy().T
        np.testing.assert_array_equal(np.asarray(params["blocks"]["att"]["key"]["kernel"][0]), want)  # block 1
    model, params = load(str(tmp_path / "st"), dtype=jnp.bfloat16)
    assert params["head"]["kernel"].dtype == jnp.bfloat16
    step = jax.jit(lambda p, x: model.apply({"params": p}, x, recurrent=True))
    logits, state = step(params, np.ones((1, 1), np.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert state.wkv.dtype == jnp.float32 and state.att_x_prev.dtype == jnp.bfloat16


def _save(tmp_path, sd, name="bad.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return str(path)


def test_missing_tensor_error(tmp_path):
    sd = random_checkpoint()
    del sd["blocks.1.att.a2"]
    path = _save(tmp_path, sd)
    with pytest.raises(ValueError, match=r"bad\.pth.*missing tensor.*blocks\.1\.att\.a2"):
        load(path)
    sd = random_checkpoint()
    del sd["emb.weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'emb\.weight'"):
        load(_save(tmp_path, sd))


def test_misshaped_tensor_error(tmp_path):
    sd = random_checkpoint()
    sd["blocks.1.att.w1"] = torch.zeros(C, DW + 1)
    with pytest.raises(ValueError, match=r"bad\.pth.*'blocks\.1\.att\.w1' has shape \(128, 33\), "
                                         r"expected \(128, 32\)"):
        load(_save(tmp_path, sd))
    sd = random_checkpoint()
    sd["blocks.0.ffn.value.weight"] = torch.zeros(F, C)
    with pytest.raises(ValueError, match=r"'blocks\.0\.ffn\.value\.weight' has shape"):
        load(_save(tmp_path, sd))


def test_unexpected_and_deepembed_rejected(tmp_path):
    sd = random_checkpoint()
    sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(V, 1024)
    with pytest.raises(ValueError, match=r"DeepEmbed.*blocks\.0\.ffn\.s_emb\.weight"):
        load(_save(tmp_path, sd))
    sd = random_checkpoint()
    sd["modality.adapter.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"unexpected tensor.*modality\.adapter\.weight"):
        load(_save(tmp_path, sd))


def test_init_matches_checkpoint_layout_and_applies(loaded, apply_p, tokens):
    """model.init gives the loader's tree (names, shapes, logical axes); apply works, peft=None."""
    model, params = loaded
    fresh = RWKV7(model.config)
    variables = jax.jit(lambda key, x: fresh.init(key, x, recurrent=True))(jax.random.key(0),
                                                                            tokens[:, :1])
    assert set(variables) == {"params"}
    init_params = nn.meta.unbox(variables["params"])
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)  # noqa: E731
    assert shapes(init_params) == shapes(params)
    specs = nn.get_partition_spec(variables["params"])
    assert specs["blocks_0"]["att"]["receptance"]["kernel"] == P("embed", "heads")
    assert specs["blocks"]["att"]["receptance"]["kernel"] == P("layers", "embed", "heads")  # blocks 1 ... L-1
    assert specs["blocks"]["ffn"]["value"]["kernel"] == P("layers", "mlp", "embed")
    assert specs["head"]["kernel"] == P("embed", "vocab")
    logits, state = apply_p(init_params, tokens, None, False)  # model.apply, peft=None
    assert logits.shape == (2, T, V) and isinstance(state, RWKV7State)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow
def test_remat_same_logits_and_grads(loaded, tokens):
    model, params = loaded
    remat = RWKV7(RWKV7Config(**model.config.arch_dict(), remat=True))
    toks = tokens[:, :8]

    def loss(p, m):
        logits, _ = m.apply({"params": p}, toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, jnp.roll(toks, -1, 1)[..., None], -1)[..., 0])

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l1, g1 = grad(params, model)
    l2, g2 = grad(params, remat)
    assert abs(float(l1) - float(l2)) <= 1e-6
    assert max(jax.tree.leaves(jax.tree.map(max_diff, g1, g2))) <= 1e-5


def official_greedy(official, prompt: list[int], n_new: int):
    """The official package's recurrent greedy decoding of one prompt alone: (tokens, logits [n, V],
    per-step states in our layout after each fed token)."""
    logits, state = official.forward(prompt, None)
    tokens, all_logits, states = [], [], []
    for _ in range(n_new):
        all_logits.append(logits.numpy())
        tokens.append(int(np.argmax(all_logits[-1])))
        logits, state = official.forward([tokens[-1]], state)
        states.append(official_state_as_ours(state))
    return tokens, np.stack(all_logits), states


def test_shared_sampler_left_padded_greedy_matches_official(official, loaded, tokens):
    """Acceptance: a greedy left-padded batch through rollout.Sampler gives, for 32 new tokens, the
    official recurrent greedy tokens of each prompt alone, logits within 1e-4 (fp32), and the state
    after each row's last token (a shorter budget stops a row's state at its own last token)."""
    model, params = loaded
    n_new = 32
    prompts = [tokens[0, :5].tolist(), tokens[1, :11].tolist(), tokens[0, 3:19].tolist()]
    padded, mask = rollout.left_pad(prompts, pad_id=0)
    sampler = rollout.Sampler(model, rollout.SamplingConfig(max_new_tokens=n_new, temperature=0.0), pad_id=0)
    steps = []
    out, state = sampler.stream({"params": params}, padded, mask, jax.random.key(0), steps.append)
    budgets = np.array([n_new, 10, 20], np.int32)
    short, short_state = sampler({"params": params}, padded, mask, jax.random.key(0), budgets=budgets,
                                 return_state=True)
    whole = sampler({"params": params}, padded, mask, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(whole.tokens), np.asarray(out.tokens))
    assert len(steps) == n_new and all(s.active.all() for s in steps)
    for b, prompt in enumerate(prompts):
        ref_tokens, ref_logits, ref_states = official_greedy(official, prompt, n_new)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref_tokens)
        d = max_diff(np.stack([s.logits[b] for s in steps]), ref_logits)
        print(f"shared sampler vs official, prompt {b} ({len(prompt)} tokens): max |dlogits| = {d:.2e}")
        assert d <= TOL
        for ours, theirs in zip(state, ref_states[-1]):
            assert max_diff(ours[:, b], theirs) <= TOL
        n = int(budgets[b])
        np.testing.assert_array_equal(np.asarray(short.tokens[b, :n]), ref_tokens[:n])
        assert int(short.lengths[b]) == n
        for ours, theirs in zip(short_state, ref_states[n - 1]):
            assert max_diff(ours[:, b], theirs) <= TOL


def test_left_padding_leaves_state_as_without_pads(loaded, tokens):
    """Pad steps are exact no-ops: the padded prompt's state equals the unpadded one's, also when the
    prefill continues from a nonzero state (a chat turn) and when it starts from embeddings."""
    model, params = loaded
    fam = rwkv_model.RWKV7Family(model)
    prefill = jax.jit(fam.prefill)
    variables = {"params": params}
    prompt = tokens[:1, :7]
    start = fam.init_state(1, 0)
    plain_logits, plain = prefill(variables, start, prompt, np.ones((1, 7), bool))
    _, chat_state = prefill(variables, start, tokens[1:, :9], np.ones((1, 9), bool))
    chat_logits, chat = prefill(variables, chat_state, prompt, np.ones((1, 7), bool))
    padded = np.concatenate([np.full((1, 9), 5, np.int32), prompt], axis=1)
    mask = np.arange(16)[None] >= 9
    for begin, want_logits, want in ((start, plain_logits, plain), (chat_state, chat_logits, chat)):
        logits, got = prefill(variables, begin, padded, mask)
        assert max_diff(logits, want_logits) <= 1e-5
        for a, b in zip(got, want):
            assert max_diff(a, b) <= 1e-5
    embeddings = model.apply(variables, jnp.asarray(padded), method=RWKV7.embed)
    logits, got = prefill(variables, start, None, mask, embeddings=embeddings)
    assert max_diff(logits, plain_logits) <= 1e-5
