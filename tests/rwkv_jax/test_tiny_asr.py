"""The tiny ASR default's short Whisper window through the data layer and ModRWKV, and its shipped encoder
(assets/tiny-asr/whisper) against transformers."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperModel

from rwkv_jax import data, modrwkv
from rwkv_jax import multimodal as mm
from rwkv_jax.encoders import audio, whisper

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "assets" / "tiny-asr" / "whisper"
TINY_RWKV = ROOT / "assets" / "tiny-rwkv7"


class _Chars:
    """A tokenizer of one id per character (enough for prepare)."""

    def encode(self, text):
        return [ord(ch) % 250 + 1 for ch in text]


def test_prepare_uses_the_whisper_chunk():
    (record,) = data.dtmf_records(1, seed=3, instruction=None)
    wave = record.audio[0]
    config = data.PrepareConfig(seq_len=160, tokenizer=_Chars(), chat_format=mm.PAPER_ERA, audio="whisper",
                                whisper_chunk_seconds=4, max_audio_seconds=4.0)
    example = data.prepare(record, config)
    features, mask = audio.whisper_features(wave, 80, chunk_seconds=4)
    assert example["audio_inputs"].shape == (1, 80, 400) and example["audio_mask"].shape == (1, 400)
    np.testing.assert_array_equal(example["audio_inputs"][0], features[0])
    np.testing.assert_array_equal(example["audio_mask"][0], mask[0])
    frames = -(-wave.size // 160) // 2 + 1  # the reference's mask.sum() // 2 + 1
    assert example["audio_frames"][0] == frames == data.whisper_frames(wave.size, 4)
    assert example["audio_slots"][0] == mm.audio_adapter_length(frames) == example["modality_mask"].sum()
    assert data.whisper_frames(10 * 16000, 4) == 200  # a clip past the window keeps every position
    with pytest.raises(ValueError, match="whisper_chunk_seconds=4"):
        data.PrepareConfig(seq_len=16, audio="whisper", whisper_chunk_seconds=4)  # max_audio_seconds 30 > 4
    long = data.MultimodalRecord(record.conversation, [], [np.zeros(5 * 16000, np.float32)], "long")
    with pytest.raises(data.BadRecord, match="max_audio_seconds=4.0"):
        data.prepare(long, config)


def _asset():
    if not (ASSET / "model.safetensors").exists():
        pytest.skip(f"{ASSET} is not built (python launch/make_tiny_asr.py)")
    return ASSET


def test_tiny_asr_encoder_matches_transformers():
    path = _asset()
    assert sum(p.stat().st_size for p in path.iterdir()) < 2_000_000
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    assert (extractor.chunk_length, extractor.feature_size) == (4, 80)
    waves = [r.audio[0] for r in data.dtmf_records(3, seed=11)]
    features, mask = audio.whisper_features(waves, 80, chunk_seconds=4)
    ref_in = extractor(waves, sampling_rate=16000, return_attention_mask=True, return_tensors="np")
    assert np.abs(features - ref_in["input_features"]).max() <= 1e-4
    model = WhisperModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    encoder, params = whisper.load_whisper(path)
    out, lengths = jax.jit(encoder.apply)({"params": params}, jnp.asarray(features), jnp.asarray(mask))
    assert out.shape == (3, 200, encoder.config.d_model)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-4
    np.testing.assert_array_equal(lengths, mask.sum(1) // 2 + 1)


def test_tiny_asr_encoder_in_modrwkv():
    family, params = modrwkv.from_parts(_asset(), TINY_RWKV)
    (record,) = data.dtmf_records(1, seed=5)
    wave = record.audio[0]
    inputs = family.preprocess([wave])
    assert inputs["inputs"].shape == (1, 80, 400)  # the checkpoint's 4 s window, not 30 s
    embeds, counts = family.module.apply({"params": params}, jnp.asarray(inputs["inputs"])[None],
                                         jnp.asarray(inputs["attention_mask"])[None], method=modrwkv.ModRWKV.encode)
    slots = mm.audio_adapter_length(data.whisper_frames(wave.size, 4))
    assert int(counts[0]) == slots and embeds.shape == (1, 101, family.config.rwkv.n_embd)


def test_cached_whisper_features_give_the_losses_of_the_encoder(tmp_path):
    """configs/modrwkv_asr.py:tiny's stage 2 on the shipped assets: three updates from cached encoder features
    (cropped to each clip's frames by the model) equal three from the mel features through the encoder."""
    from configs import modrwkv_asr
    from rwkv_jax import modrwkv_task
    from test_modrwkv_task import _three_losses  # one stage-2 run of three updates (same test folder)

    _asset()
    c = modrwkv_task.stage_config(modrwkv_asr.get_config("tiny"), "stage2", None)
    c.data.update(synthetic_size=16, heldout_size=4, feature_cache="")  # the config caches by default
    c.train.update(batch_size=8, micro_batch_size=4)
    c.optim.warmup_steps = 0
    c.eval.update(examples=4, batch_size=4, max_new_tokens=4)

    plain_rows, plain = _three_losses(c)
    c.data.feature_cache = str(tmp_path / "cache")
    rows, cached = _three_losses(c)
    assert "attention_mask" in plain_rows and "features" in rows
    assert rows["features"].shape == (8, 1, 200, 64)  # the 4 s window's 200 positions, uncropped
    np.testing.assert_array_equal(rows["feature_lengths"][:, 0], plain_rows["attention_mask"][:, 0].sum(-1) // 2 + 1)
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-6)
    assert plain[0] != plain[-1]
