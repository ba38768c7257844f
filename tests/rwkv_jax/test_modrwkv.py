"""The ModRWKV model: parallel forward == RNN prefill + decoding, a batch == its rows, the second turn of a
chat == the whole conversation in parallel mode, and its checkpoints (ours and the reference's layouts)."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
import torch
import transformers

from jaxrl_peft.models import family as family_lib
from jaxrl_peft.models.safetensors_io import CheckpointError, SafetensorsFile, save_safetensors
from jaxrl_peft.rl import rollout
from rwkv_jax import model as rwkv
from rwkv_jax import modrwkv
from rwkv_jax import multimodal as mm

IMAGE = 12


def _rwkv_dir(path: Path) -> Path:
    """A tiny random RWKV-7 with the World vocabulary (the placeholder ids 65530-65532 exist)."""
    cfg = rwkv.RWKV7Config(vocab_size=65536, n_embd=64, n_layer=2, head_size=32, dim_ffn=128, decay_lora=8,
                           iclr_lora=8, value_lora=8, gate_lora=8)
    params = rwkv.RWKV7(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    # the official init zeroes the output projections (the state would not matter): perturb every weight
    params = jax.tree.map(lambda x: (np.asarray(x) + rng.normal(0, 0.2, np.shape(x))).astype(np.float32),
                          nn.unbox(params))
    params["emb"]["embedding"] = rng.normal(0, 1, (65536, 64)).astype(np.float32)
    rwkv.save(str(path), cfg, params)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("modrwkv")
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=IMAGE,
        patch_size=4))
    vision.save_pretrained(root / "siglip")
    transformers.SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "siglip")
    whisper = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=50, num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=32,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=32, max_source_positions=1500,
        max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    whisper.save_pretrained(root / "whisper")
    return {"siglip": root / "siglip", "whisper": root / "whisper", "rwkv": _rwkv_dir(root / "rwkv"), "root": root}


@pytest.fixture(scope="module")
def vision(dirs):
    return modrwkv.from_parts(dirs["siglip"], dirs["rwkv"], seed=1)


@pytest.fixture(scope="module")
def audio(dirs):
    return modrwkv.from_parts(dirs["whisper"], dirs["rwkv"], seed=2)


def _images(n, seed=0):
    return [np.random.default_rng(seed + i).integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8) for i in range(n)]


def _prompt(family, question, slots):
    example = mm.generation_prompt(question, [slots] if slots else [], family.config.format,
                                   family.tokenizer().inner)
    return example.input_ids, example.modality_mask


def _slots(family, params, inputs, attention_mask=None):
    return int(family.module.apply({"params": params}, jnp.asarray(inputs)[:1], attention_mask,
                                   method=modrwkv.ModRWKV.encode)[1][0])


def test_parallel_forward_equals_prefill_then_recurrent_decoding(vision):
    family, params = vision
    variables = {"params": params}
    pixels = family.preprocess(_images(1))["inputs"]
    slots = _slots(family, params, pixels)
    assert slots == (IMAGE // 4) ** 2
    ids, mask = _prompt(family, "<image>What is in the picture?", slots)
    tokens, mask = jnp.asarray(ids)[None], jnp.asarray(mask)[None]
    parallel = family.module.apply(variables, tokens, jnp.asarray(pixels)[None], mask)[0][0]
    embeds = family.module.apply(variables, tokens, jnp.asarray(pixels)[None], mask,
                                 method=modrwkv.ModRWKV.prompt_embeddings)
    split = slots + 3  # prefill through the image and a few tokens, then one token at a time
    logits, state = family.module.apply(variables, None, embeddings=embeds[:, :split])
    steps = [logits[0]]
    for t in range(split, tokens.shape[1]):
        out, state = family.module.apply(variables, None, state=state, embeddings=embeds[:, t:t + 1], recurrent=True)
        steps.append(out[0])
    recurrent = jnp.concatenate(steps)
    np.testing.assert_allclose(np.asarray(recurrent), np.asarray(parallel), atol=1e-4, rtol=0)
    assert float(jnp.std(parallel[-1])) > 0.1  # the logits are not flat: the comparison can fail


def _sample(family, params, rows, new_tokens=8):
    """Greedy continuations of multimodal prompt rows [(ids, slot mask, pixels)], left-padded in one batch."""
    sampler = rollout.Sampler(family, rollout.SamplingConfig(temperature=0.0, max_new_tokens=new_tokens), pad_id=0,
                              stop_tokens=family.stop_ids(family.tokenizer()))
    length = max(len(ids) for ids, _, _ in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    slots = np.zeros((len(rows), length), bool)
    for r, (ids, mask, _) in enumerate(rows):
        tokens[r, length - len(ids):], valid[r, length - len(ids):], slots[r, length - len(ids):] = ids, True, mask
    pixels = jnp.asarray(np.stack([p for _, _, p in rows]))[:, None]
    embeds = family.module.apply({"params": params}, jnp.asarray(tokens), pixels, jnp.asarray(slots),
                                 method=modrwkv.ModRWKV.prompt_embeddings)
    return sampler({"params": params}, tokens, valid, jax.random.key(0), embeddings=embeds)


def test_a_batch_equals_its_rows_one_at_a_time(vision):
    family, params = vision
    pixels = family.preprocess(_images(2, seed=5))["inputs"]
    slots = _slots(family, params, pixels)
    rows = [(*_prompt(family, "<image>Describe it.", slots), pixels[0]),
            (*_prompt(family, "<image>How many shapes are there in this picture, exactly?", slots), pixels[1])]
    batch = _sample(family, params, rows)
    for r, row in enumerate(rows):
        alone = _sample(family, params, [row])
        np.testing.assert_array_equal(np.asarray(batch.tokens[r]), np.asarray(alone.tokens[0]))
        np.testing.assert_allclose(np.asarray(batch.logprobs[r]), np.asarray(alone.logprobs[0]), atol=1e-4)
    assert np.abs(np.asarray(batch.logprobs[0]) - np.asarray(batch.logprobs[1])).max() > 1e-3  # rows differ


def test_second_turn_equals_the_whole_conversation_in_parallel_mode(vision):
    family, params = vision
    variables = {"params": params}
    pixels = family.preprocess(_images(1, seed=9))["inputs"]
    slots = _slots(family, params, pixels)
    sampler = rollout.Sampler(family, rollout.SamplingConfig(temperature=0.0, max_new_tokens=6), pad_id=0,
                              stop_tokens=family.stop_ids(family.tokenizer()))
    ids1, mask1 = _prompt(family, "<image>What is this?", slots)
    embeds = family.module.apply(variables, jnp.asarray(ids1)[None], jnp.asarray(pixels)[None],
                                 jnp.asarray(mask1)[None], method=modrwkv.ModRWKV.prompt_embeddings)
    out1, state = sampler(variables, ids1[None], np.ones((1, len(ids1)), bool), jax.random.key(0),
                          embeddings=embeds, return_state=True)
    gen1 = np.asarray(out1.tokens[0][:int(out1.lengths[0])]).tolist()
    ids2, _ = _prompt(family, "And its colour?", 0)
    drawn = []
    out2, _ = sampler.stream(variables, ids2[None], np.ones((1, len(ids2)), bool), jax.random.key(1),
                             lambda step: drawn.append(step.logits[0]), state=state)
    gen2 = np.asarray(out2.tokens[0][:int(out2.lengths[0])]).tolist()
    whole = np.asarray(ids1.tolist() + gen1 + ids2.tolist() + gen2, np.int32)
    slot_mask = np.zeros(len(whole), bool)
    slot_mask[:len(mask1)] = mask1
    logits = family.module.apply(variables, jnp.asarray(whole)[None], jnp.asarray(pixels)[None],
                                 jnp.asarray(slot_mask)[None])[0][0]
    start = len(ids1) + len(gen1) + len(ids2) - 1  # the position whose logits drew turn 2's first token
    np.testing.assert_allclose(np.stack(drawn), np.asarray(logits[start:start + len(drawn)]), atol=1e-4, rtol=0)


def test_chat_keeps_the_conversation_and_never_re_encodes(vision):
    family, params = vision
    chat = modrwkv.Chat(family, {"params": params}, rollout.SamplingConfig(temperature=0.0, max_new_tokens=5))
    streamed = []
    first = chat.ask("What is this?", _images(1, seed=3), on_text=streamed.append)
    assert "".join(streamed) == first
    chat.ask("Again?")
    assert len(chat.items) == 1 and sum(chat.generated) >= 2
    logits = family.module.apply({"params": params}, jnp.asarray(chat.history)[None],
                                 jnp.asarray(chat.items[0]["inputs"])[None], jnp.asarray(chat.modality_mask)[None])[0][0]
    greedy = np.asarray(jnp.argmax(logits, -1))
    # every token the chat generated is the parallel model's argmax after the conversation before it
    for i in np.flatnonzero(chat.generated):
        assert greedy[i - 1] == chat.history[i], i


def test_audio_slots_follow_the_valid_length_and_batch_equals_rows(audio, dirs):
    family, params = audio
    waves = [np.random.default_rng(i).normal(0, 0.1, n).astype(np.float32) for i, n in enumerate((8000, 12800))]
    inputs = family.preprocess(waves)
    frames = inputs["attention_mask"].sum(-1)
    variables = {"params": params}
    embeds, counts = family.module.apply(variables, jnp.asarray(inputs["inputs"])[:, None],
                                         jnp.asarray(inputs["attention_mask"])[:, None], method=modrwkv.ModRWKV.encode)
    want = [mm.audio_adapter_length(int(f) // 2 + 1) for f in frames]
    assert counts.tolist() == want
    rows = []
    for r in range(2):
        ids, mask = _prompt(family, "", want[r])
        rows.append((ids, mask))
    length = max(len(ids) for ids, _ in rows)
    tokens = np.zeros((2, length), np.int32)
    slots = np.zeros((2, length), bool)
    for r, (ids, mask) in enumerate(rows):  # right-padded rows for the parallel forward
        tokens[r, :len(ids)], slots[r, :len(ids)] = ids, mask
    both = family.module.apply(variables, jnp.asarray(tokens), jnp.asarray(inputs["inputs"])[:, None], slots,
                               attention_mask=jnp.asarray(inputs["attention_mask"])[:, None])[0]
    for r, (ids, mask) in enumerate(rows):
        alone = family.module.apply(variables, jnp.asarray(ids)[None], jnp.asarray(inputs["inputs"])[r:r + 1, None],
                                    jnp.asarray(mask)[None],
                                    attention_mask=jnp.asarray(inputs["attention_mask"])[r:r + 1, None])[0]
        np.testing.assert_allclose(np.asarray(both[r, :len(ids)]), np.asarray(alone[0]), atol=1e-4, rtol=0)
    path = dirs["root"] / "clip.wav"
    soundfile.write(path, waves[0], 16000)
    chat = modrwkv.Chat(family, variables, rollout.SamplingConfig(temperature=0.0, max_new_tokens=4))
    assert isinstance(chat.ask("", [str(path)]), str)
    assert sum(chat.modality_mask) == want[0]


def test_wrong_slot_count_is_a_clear_error(vision):
    family, params = vision
    pixels = family.preprocess(_images(1))["inputs"]
    ids, mask = _prompt(family, "<image>hi", 5)
    with pytest.raises(ValueError, match="modality slot"):
        family.module.apply({"params": params}, jnp.asarray(ids)[None], jnp.asarray(pixels)[None],
                            jnp.asarray(mask)[None])


def _same(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("which", ["vision", "audio"])
def test_save_load_round_trip(which, vision, audio, tmp_path):
    family, params = vision if which == "vision" else audio
    modrwkv.save(tmp_path / "m", family, params)
    assert family_lib.detect(tmp_path / "m") == "modrwkv"
    loaded, loaded_params = family_lib.load(tmp_path / "m")
    assert isinstance(loaded, modrwkv.ModRWKVFamily) and loaded.config == family.config
    _same(params, loaded_params)


def test_compressed_model_and_reference_round_trip(dirs, tmp_path):
    family, params = modrwkv.from_parts(dirs["siglip"], dirs["rwkv"], compress=True, seed=3)
    pixels = family.preprocess(_images(1))["inputs"]
    assert _slots(family, params, pixels) == mm.compressed_length((IMAGE // 4) ** 2)
    for layout in ("later", "paper"):
        hf_tensors = SafetensorsFile(dirs["siglip"] / "model.safetensors").load_all()
        encoder = {k.removeprefix("vision_model."): v for k, v in hf_tensors.items()}  # reference names
        tensors = modrwkv.to_reference(family, params, layout, encoder_tensors=encoder)
        save_safetensors(tmp_path / f"{layout}.safetensors", tensors)
        back, back_params = modrwkv.from_reference(tmp_path / f"{layout}.safetensors", dirs["siglip"])
        assert back.config.compress and back.config.adapter_ratio == 4
        _same(params, back_params)
        again = modrwkv.to_reference(back, back_params, layout, encoder_tensors=encoder)
        assert sorted(again) == sorted(tensors)
        for name in tensors:
            np.testing.assert_array_equal(again[name], tensors[name], err_msg=name)


def test_mismatched_checkpoint_is_refused(vision, tmp_path):
    family, params = vision
    modrwkv.save(tmp_path / "m", family, params)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["compress"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="compress"):
        modrwkv.load(tmp_path / "m")
    config["compress"], config["rwkv"]["n_layer"] = False, 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config says"):
        modrwkv.load(tmp_path / "m")


def test_chat_command_streams_two_turns(vision, tmp_path, capsys):
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("chat_cli", Path(__file__).parents[2] / "launch" / "chat.py")
    chat_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat_cli)

    family, params = vision
    modrwkv.save(tmp_path / "m", family, params)
    Image.fromarray(_images(1, seed=4)[0]).save(tmp_path / "photo.png")
    code = chat_cli.main([f"--checkpoint={tmp_path / 'm'}", f"--image={tmp_path / 'photo.png'}",
                          "--prompt=What is it?", "--prompt=Sure?", "--max_new_tokens=4"])
    out = capsys.readouterr()
    assert code == 0 and out.out.count("assistant> ") == 2
    assert "tokens generated so far" in out.err
    assert chat_cli.main([f"--checkpoint={tmp_path / 'nothing'}", "--prompt=hi"]) == 2
    assert chat_cli.main([f"--checkpoint={tmp_path / 'm'}", f"--audio={tmp_path / 'photo.png'}", "--prompt=hi"]) == 2
    assert "takes vision input" in capsys.readouterr().err
