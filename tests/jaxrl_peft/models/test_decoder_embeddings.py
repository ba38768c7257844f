"""The R1-Distill decoder fed input embeddings in place of tokens (HF's `inputs_embeds`): parity with
transformers (torch, CPU, fp32) for the full forward and for family prefill + greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_transformer import VOCAB, make_hf  # noqa: E402

from jaxrl_peft.models import family as family_lib, hf, transformer as tfm  # noqa: E402


def hf_embeds_logits(model, embeds, mask=None) -> np.ndarray:
    """transformers' logits [B, T, V] from inputs_embeds [B, T, D], positions from the mask as ours."""
    kw = {}
    if mask is not None:
        m = torch.tensor(np.asarray(mask), dtype=torch.long)
        kw = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(inputs_embeds=torch.tensor(np.asarray(embeds)), **kw).logits.float().numpy()


def left_padded(rng: np.random.RandomState, batch: int, length: int,
                pads: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, T] and a mask [B, T], False on each row's first `pads[i]` slots."""
    tokens = rng.randint(0, VOCAB, (batch, length))
    mask = np.arange(length)[None, :] >= np.asarray(pads)[:, None]
    return tokens, mask


@pytest.mark.parametrize("kind,tie,scan", [("qwen2", False, True), ("qwen2", True, False), ("llama", False, True)])
def test_inputs_embeds_match_transformers(tmp_path, kind, tie, scan):
    ref = make_hf(kind, tie, seed=3)
    ref.save_pretrained(tmp_path)
    model, params = hf.load(tmp_path, dtype=jnp.float32, scan_layers=scan)
    v = {"params": params}
    rng = np.random.RandomState(4)
    # Arbitrary vectors, not rows of the table: what an encoder's outputs spliced in look like.
    embeds = rng.normal(0, 0.5, (2, 24, model.cfg.hidden_size)).astype(np.float32)
    ours = np.asarray(model.apply(v, None, embeddings=jnp.asarray(embeds)))
    diff = np.abs(ours - hf_embeds_logits(ref, embeds)).max()
    assert diff <= 1e-4, diff

    _, mask = left_padded(rng, 2, 24, [5, 0])
    ours = np.asarray(model.apply(v, None, attention_mask=jnp.asarray(mask), embeddings=jnp.asarray(embeds)))
    theirs = hf_embeds_logits(ref, embeds, mask)
    diff = np.abs(ours[mask] - theirs[mask]).max()
    assert diff <= 1e-4, diff

    # `embed` is transformers' input embedding, and feeding it back equals feeding the tokens.
    tokens = rng.randint(0, VOCAB, (2, 24))
    table = np.asarray(model.apply(v, jnp.asarray(tokens), method="embed"))
    with torch.no_grad():
        theirs = ref.get_input_embeddings()(torch.tensor(tokens)).numpy()
    np.testing.assert_array_equal(table, theirs)
    np.testing.assert_allclose(model.apply(v, None, embeddings=jnp.asarray(table)),
                               model.apply(v, jnp.asarray(tokens)), atol=1e-6)


def greedy(family, variables, tokens, mask, embeddings, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The Sampler's greedy path, done by hand: prefill, then `steps` decode steps feeding the argmax.
    Returns the tokens [B, steps] and the logits [B, steps, V] each was picked from."""
    state = family.init_state(mask.shape[0], mask.shape[1] + steps)
    prefill = jax.jit(family.prefill)
    step = jax.jit(family.decode_step)
    logits, state = prefill(variables, state, tokens, jnp.asarray(mask), embeddings=embeddings)
    out, seen = [], []
    active = jnp.ones((mask.shape[0],), jnp.bool_)
    for _ in range(steps):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(token)
        seen.append(logits)
        logits, state = step(variables, state, token, active)
    return np.asarray(jnp.stack(out, 1)), np.asarray(jnp.stack(seen, 1))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_prefill_from_embeddings_decodes_like_tokens(tmp_path, kind):
    ref = make_hf(kind, seed=5)
    ref.save_pretrained(tmp_path)
    family, params = family_lib.load(tmp_path, dtype=jnp.float32)
    assert isinstance(family, family_lib.DecoderFamily)
    v = {"params": params}
    rng = np.random.RandomState(6)
    tokens, mask = left_padded(rng, 3, 10, [4, 0, 7])
    steps = 8
    embeds = family.module.apply(v, jnp.asarray(tokens), method="embed")  # [B, P, D]
    want, want_logits = greedy(family, v, jnp.asarray(tokens), mask, None, steps)
    got, got_logits = greedy(family, v, None, mask, embeds, steps)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
    assert len(np.unique(want)) > 2  # the greedy path is not one repeated token

    # Splice arbitrary vectors into the prompt (as an encoder would): every decoded step's logits are
    # transformers' full forward over [spliced prompt, embedded generated tokens].
    spliced = np.array(embeds)
    spliced[:, 7:9] = rng.normal(0, 0.5, (3, 2, spliced.shape[-1]))
    got, got_logits = greedy(family, v, None, mask, jnp.asarray(spliced), steps)
    with torch.no_grad():
        gen = ref.get_input_embeddings()(torch.tensor(got)).numpy()
    full = np.concatenate([spliced, gen], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(got, bool)], axis=1)
    theirs = hf_embeds_logits(ref, full, full_mask)[:, mask.shape[1] - 1:-1]  # [B, steps, V]
    diff = np.abs(got_logits - theirs).max()
    assert diff <= 1e-4, diff


def test_bad_embeddings_fail_clearly():
    cfg = tfm.preset("tiny", dtype="float32")
    params = tfm.init_params(cfg, jax.random.key(0))
    model = tfm.Transformer(cfg)
    with pytest.raises(ValueError, match="exactly one"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), embeddings=jnp.zeros((1, 4, 64)))
    with pytest.raises(ValueError, match="embeddings must be"):
        model.apply({"params": params}, None, embeddings=jnp.zeros((1, 4, 32)))
    family = family_lib.DecoderFamily(model)
    state = family.init_state(1, 8)
    with pytest.raises(ValueError, match="matching mask"):
        family.prefill({"params": params}, state, None, jnp.ones((1, 5), bool), embeddings=jnp.zeros((1, 4, 64)))
