"""Audio encoders and front ends against transformers (tiny random Whisper / WavLM checkpoints, fp32 CPU)."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForCTC, WavLMModel, WhisperConfig,
                          WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperModel)
from transformers.models.whisper.modeling_whisper import sinusoids as torch_sinusoids

from jaxrl_peft.models.safetensors_io import CheckpointError, SafetensorsFile, save_safetensors
from jaxrl_peft.peft import registry
from rwkv_jax.encoders import audio, wavlm, whisper

TOL = 1e-4
# torch's own multi_head_attention_forward warns when given WavLM's float bias with a bool padding mask.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")


def _clips(lengths, seed=0):
    """Noise plus a tone per clip, so spectra have structure and every clip differs."""
    rng = np.random.default_rng(seed)
    t = np.arange(max(lengths)) / 16000
    return [(0.1 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t[:n])).astype(np.float32)
            for i, n in enumerate(lengths)]


def _rewrite(path, transform):
    """Rewrites model.safetensors in `path` with transform(dict of tensors) -> dict of tensors."""
    file = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in SafetensorsFile(file).load_all().items()}
    save_safetensors(file, transform(tensors))


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


# ---------------------------------------------------------------------------------------------
# Front ends

@pytest.mark.parametrize("n_mels,chunk", [(80, 30), (128, 30), (80, 4)])
def test_whisper_features_match_transformers(n_mels, chunk):
    clips = _clips([16000, 8123, 40000, 31 * 16000 + 77])  # the last is cut to the chunk
    extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk)
    ref = extractor(clips, sampling_rate=16000, return_attention_mask=True, return_tensors="np")
    kwargs = {} if chunk == 30 else {"chunk_seconds": chunk}  # 30 s is the default
    features, mask = audio.whisper_features(clips, n_mels=n_mels, **kwargs)
    frames = extractor.nb_max_frames
    assert frames == 100 * chunk == audio.whisper_mel_frames(chunk)
    assert features.shape == ref["input_features"].shape == (4, n_mels, frames) and features.dtype == np.float32
    assert np.abs(features - ref["input_features"]).max() <= TOL
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert list(mask.sum(1)) == [100, 51, min(250, frames), frames]


def test_whisper_chunk_seconds_reads_and_checks_the_preprocessor():
    assert audio.whisper_chunk_seconds(None) == 30
    assert audio.whisper_chunk_seconds({"chunk_length": 4}, max_source_positions=200) == 4
    with pytest.raises(ValueError, match="max_source_positions 1500"):
        audio.whisper_chunk_seconds({"chunk_length": 4}, max_source_positions=1500)
    with pytest.raises(ValueError, match="whole number of seconds"):
        audio.whisper_chunk_seconds({"chunk_length": 2.5})
    with pytest.raises(ValueError, match="whole number of seconds"):
        audio.whisper_features(_clips([100]), chunk_seconds=0)


@pytest.mark.parametrize("do_normalize", [True, False])
def test_wavlm_inputs_match_wav2vec2_extractor(do_normalize):
    clips = _clips([3000, 1234, 2500])
    ref = Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=True)(
        clips, sampling_rate=16000, padding=True, return_tensors="np")
    values, mask = audio.wavlm_inputs(clips, do_normalize=do_normalize)
    np.testing.assert_allclose(values, ref["input_values"], atol=1e-6)
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_read_audio_decodes_and_mixes_to_mono(tmp_path, monkeypatch):
    soundfile = pytest.importorskip("soundfile")
    stereo = np.stack(_clips([1600, 1600], seed=1), axis=1) * 0.5  # [T, 2]
    soundfile.write(tmp_path / "clip.wav", stereo, 16000, subtype="FLOAT")
    samples, rate = audio.read_audio(tmp_path / "clip.wav")
    assert rate == 16000 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, stereo.mean(axis=1), atol=1e-7)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="bad.wav"):
        audio.read_audio(tmp_path / "bad.wav")
    monkeypatch.setattr(audio, "soundfile", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[multimodal\]"'):
        audio.read_audio(tmp_path / "clip.wav")


# ---------------------------------------------------------------------------------------------
# Whisper

def _whisper_config(**overrides):
    fields = dict(vocab_size=64, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                  encoder_ffn_dim=48, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=48,
                  max_source_positions=12, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, decoder_start_token_id=1)
    fields.update(overrides)
    return WhisperConfig(**fields)


def _save(model, path):
    model.eval().save_pretrained(path)
    return model


@pytest.mark.parametrize("model_cls", [WhisperModel, WhisperForConditionalGeneration])
def test_whisper_encoder_matches_transformers(tmp_path, model_cls):
    torch.manual_seed(0)
    model = _save(model_cls(_whisper_config()), tmp_path)
    features = torch.randn(3, 16, 24)
    mask = np.zeros((3, 24), np.int32)
    mask[0], mask[1, :10], mask[2, :3] = 1, 1, 1
    with torch.no_grad():
        ref = model.get_encoder()(features).last_hidden_state.numpy()
    encoder, params = whisper.load_whisper(tmp_path)
    out, lengths = jax.jit(encoder.apply)({"params": params}, jnp.asarray(features.numpy()))
    assert out.shape == (3, 12, 32)
    assert np.abs(np.asarray(out) - ref).max() <= TOL
    assert lengths.dtype == jnp.int32 and list(lengths) == [12, 12, 12]
    out_masked, lengths = jax.jit(encoder.apply)({"params": params}, jnp.asarray(features.numpy()), jnp.asarray(mask))
    assert np.abs(np.asarray(out_masked) - ref).max() <= TOL  # transformers ignores Whisper's mask too
    assert list(lengths) == [12, 6, 2]  # ModRWKV keeps mask.sum() // 2 + 1 frames, at most all of them


def test_whisper_encoder_on_30s_features_matches_transformers(tmp_path):
    torch.manual_seed(1)
    model = _save(WhisperModel(_whisper_config(num_mel_bins=80, max_source_positions=1500, encoder_layers=1)),
                  tmp_path)
    features, mask = audio.whisper_features(_clips([16000, 4321]), n_mels=80)
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    encoder, params = whisper.load_whisper(tmp_path)
    out, lengths = jax.jit(encoder.apply)({"params": params}, jnp.asarray(features), jnp.asarray(mask))
    assert np.abs(np.asarray(out) - ref).max() <= TOL
    assert list(lengths) == [51, 15]  # ceil(16000 / 160) // 2 + 1, ceil(4321 / 160) // 2 + 1


def test_sinusoids_match_transformers():
    np.testing.assert_allclose(whisper.sinusoids(200, 64), torch_sinusoids(200, 64).numpy(), atol=1e-5)


def test_init_for_training_scales_the_convolutions_and_starts_from_sinusoids():
    cfg = whisper.WhisperEncoderConfig(num_mel_bins=80, d_model=64, encoder_layers=1, encoder_attention_heads=2,
                                       encoder_ffn_dim=32, max_source_positions=100)
    params = whisper.init_for_training(cfg, 0)
    np.testing.assert_array_equal(params["embed_positions"], whisper.sinusoids(100, 64))
    for name, fan_in in (("conv1", 3 * 80), ("conv2", 3 * 64)):
        assert params[name]["kernel"].shape == (fan_in, 64)
        assert abs(np.std(params[name]["kernel"]) * np.sqrt(fan_in) - 1) < 0.05
    again = whisper.init_for_training(cfg, 0)
    jax.tree.map(np.testing.assert_array_equal, params, again)  # one seed, one init
    assert np.abs(whisper.init_for_training(cfg, 1)["conv1"]["kernel"] - params["conv1"]["kernel"]).max() > 0.1
    _, lengths = whisper.WhisperEncoder(cfg).apply({"params": params}, jnp.zeros((1, 80, 200)))
    assert int(lengths[0]) == 100


def test_whisper_loader_names_bad_tensors(tmp_path):
    torch.manual_seed(0)
    _save(WhisperModel(_whisper_config()), tmp_path)
    name = "encoder.layers.1.fc1.weight"
    _rewrite(tmp_path, lambda t: {**t, name: t[name][:, :-1]})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*encoder\.layers\.1\.fc1\.weight"):
        whisper.load_whisper(tmp_path)
    _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match="missing tensor 'encoder.layers.1.fc1.weight'"):
        whisper.load_whisper(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "wavlm"}))
    with pytest.raises(CheckpointError, match="model_type 'wavlm'"):
        whisper.load_whisper(tmp_path)


def test_whisper_encoder_rejects_unpadded_features(tmp_path):
    torch.manual_seed(0)
    _save(WhisperModel(_whisper_config()), tmp_path)
    encoder, params = whisper.load_whisper(tmp_path)
    with pytest.raises(ValueError, match=r"\[batch, 16, 24\]"):
        encoder.apply({"params": params}, jnp.zeros((1, 16, 20)))


# ---------------------------------------------------------------------------------------------
# WavLM

def _wavlm_config(variant, **overrides):
    """Tiny base/base+ ('base': group-norm extractor, post-LN) or large ('large': layer norm, pre-LN)."""
    large = variant == "large"
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  conv_dim=(16, 16, 24), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 2), conv_bias=large,
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
                  max_bucket_distance=40, feat_extract_norm="layer" if large else "group",
                  do_stable_layer_norm=large)
    fields.update(overrides)
    return WavLMConfig(**fields)


def _old_weight_norm_layout(tensors):
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out = {}
    for key, value in tensors.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        out[key] = value
    return out


@pytest.mark.parametrize("layout", ["parametrizations", "weight_g"])
@pytest.mark.parametrize("variant", ["base", "large"])
def test_wavlm_encoder_matches_transformers(tmp_path, variant, layout):
    torch.manual_seed(0)
    model = _save(WavLMModel(_wavlm_config(variant)), tmp_path)
    keys = SafetensorsFile(tmp_path / "model.safetensors").keys()
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in keys  # what current torch saves
    if layout == "weight_g":
        _rewrite(tmp_path, _old_weight_norm_layout)
        assert "encoder.pos_conv_embed.conv.weight_g" in SafetensorsFile(tmp_path / "model.safetensors").keys()
    values, mask = audio.wavlm_inputs(_clips([2000, 1500, 700]))
    with torch.no_grad():
        ref = model(torch.from_numpy(values)).last_hidden_state.numpy()
        ref_masked = model(torch.from_numpy(values), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
        ref_lengths = model._get_feat_extract_output_lengths(torch.from_numpy(mask.sum(-1))).numpy()
    encoder, params = wavlm.load_wavlm(tmp_path)
    out, lengths = jax.jit(encoder.apply)({"params": params}, jnp.asarray(values))
    assert out.shape == ref.shape == (3, 99, 32)
    assert np.abs(np.asarray(out) - ref).max() <= TOL
    assert list(lengths) == [99, 99, 99]
    out, lengths = jax.jit(encoder.apply)({"params": params}, jnp.asarray(values), jnp.asarray(mask))
    assert np.abs(np.asarray(out) - ref_masked).max() <= TOL
    assert np.abs(ref_masked - ref).max() > 1e-2  # the mask matters, so the comparison above tests it
    np.testing.assert_array_equal(np.asarray(lengths), ref_lengths)
    assert list(lengths) == [99, 74, 34]


def test_wavlm_task_checkpoint_and_preprocessor_without_mask(tmp_path):
    """Weights under 'wavlm.' (WavLMForCTC) load; a processor that returns no mask means no masking."""
    torch.manual_seed(2)
    model = _save(WavLMForCTC(_wavlm_config("base", vocab_size=8)), tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": False,
         "return_attention_mask": False, "sampling_rate": 16000}))
    values, mask = audio.wavlm_inputs(_clips([1800, 900]), do_normalize=False)
    with torch.no_grad():
        ref = model.wavlm(torch.from_numpy(values)).last_hidden_state.numpy()
    encoder, params = wavlm.load_wavlm(tmp_path)
    assert not encoder.config.use_attention_mask and not encoder.config.do_normalize
    out, lengths = jax.jit(encoder.apply)({"params": params}, jnp.asarray(values), jnp.asarray(mask))
    assert np.abs(np.asarray(out) - ref).max() <= TOL
    assert list(lengths) == list(model.wavlm._get_feat_extract_output_lengths(torch.tensor([1800, 900])).numpy())


def test_wavlm_relative_position_buckets_match_transformers():
    torch.manual_seed(0)
    attention = WavLMModel(_wavlm_config("base", num_buckets=320, max_bucket_distance=800)).encoder.layers[0].attention
    length = 1600
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = attention._relative_positions_bucket(offsets).numpy()
    np.testing.assert_array_equal(wavlm.relative_position_buckets(length, 320, 800), ref)


def test_wavlm_loader_rejects_unexpected_tensors(tmp_path):
    torch.manual_seed(0)
    _save(WavLMModel(_wavlm_config("base")), tmp_path)
    _rewrite(tmp_path, lambda t: {**t, "encoder.layers.0.attention.extra.weight": np.zeros((2,), np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra"):
        wavlm.load_wavlm(tmp_path)


def test_lora_reaches_the_audio_encoders(tmp_path):
    """A LoRA adapter on attention, MLP and convolution Linears changes the output exactly as merging does."""
    torch.manual_seed(0)
    _save(WavLMModel(_wavlm_config("large", num_hidden_layers=1)), tmp_path)
    method = registry.get("lora", r=2, alpha=4.0, target_modules=("q_proj", "v_proj", "intermediate_dense", "conv"))
    encoder, params = wavlm.load_wavlm(tmp_path, peft=method)
    params, adapter = registry.init_adapter(method, jax.random.key(0), params)
    assert {"q_proj", "v_proj"} <= set(adapter["encoder"]["layers_0"]["attention"])
    assert "conv_layers_2" in adapter["feature_extractor"]
    adapter = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), adapter)
    values, _ = audio.wavlm_inputs(_clips([1200]))
    adapted, _ = jax.jit(encoder.apply)({"params": params, "adapter": adapter}, jnp.asarray(values))
    merged_params = registry.merge(method, params, adapter)
    merged, _ = jax.jit(encoder.apply)({"params": merged_params}, jnp.asarray(values))
    # The merged kernels differ from the base ones, so agreeing with them means the adapter was applied.
    kernel = ("encoder", "layers_0", "attention", "q_proj", "kernel")
    assert np.abs(_at(merged_params, kernel) - _at(params, kernel)).max() > 1e-2
    assert np.abs(np.asarray(adapted) - np.asarray(merged)).max() <= TOL


def _random_encoder(seed, **overrides):
    """Our WhisperEncoder with every leaf random (gains and biases too), so a misplaced tensor shows."""
    fields = dict(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
                  max_source_positions=100)
    fields.update(overrides)
    cfg = whisper.WhisperEncoderConfig(**fields)
    shapes = jax.eval_shape(whisper.WhisperEncoder(cfg).init, jax.random.key(0),
                            jnp.zeros((1, cfg.num_mel_bins, 2 * cfg.max_source_positions)))["params"]
    leaves, treedef = jax.tree.flatten(nn.unbox(shapes))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return cfg, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_whisper_save_hf_round_trips_and_transformers_reads_it(tmp_path):
    cfg, params = _random_encoder(3)
    whisper.save_hf(tmp_path, cfg, params)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "preprocessor_config.json", "model.safetensors"}
    names = SafetensorsFile(tmp_path / "model.safetensors").keys()
    assert all(n.startswith("model.encoder.") for n in names) and "model.encoder.conv1.weight" in names

    encoder, loaded = whisper.load_whisper(tmp_path)
    assert encoder.config == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))

    # transformers reads the directory: the feature extractor of the 2 s window, the encoder's weights.
    extractor = WhisperFeatureExtractor.from_pretrained(tmp_path)
    assert (extractor.chunk_length, extractor.feature_size, extractor.nb_max_frames) == (2, 16, 200)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    fresh = WhisperFeatureExtractor(feature_size=16, chunk_length=2, return_attention_mask=True).to_dict()
    assert saved == {k: fresh[k] for k in saved}  # the fields transformers itself would write
    clips = _clips([16000, 7000, 45000])
    ref_in = extractor(clips, sampling_rate=16000, return_attention_mask=True, return_tensors="np")
    features, mask = audio.whisper_features(clips, n_mels=16, chunk_seconds=2)
    assert np.abs(features - ref_in["input_features"]).max() <= TOL
    np.testing.assert_array_equal(mask, ref_in["attention_mask"])
    model = WhisperModel.from_pretrained(tmp_path).eval()  # the decoder is not in the directory: random
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    out, lengths = jax.jit(encoder.apply)({"params": loaded}, jnp.asarray(features), jnp.asarray(mask))
    assert np.abs(ref).max() > 0.1 and np.abs(np.asarray(out) - ref).max() <= TOL
    assert list(lengths) == [51, 23, 100]  # ceil(samples / 160) // 2 + 1, at most the 100 positions
    hf_positions = model.encoder.embed_positions.weight.detach().numpy()
    np.testing.assert_array_equal(hf_positions, np.asarray(params["embed_positions"]))  # read, not re-initialised


def test_whisper_save_hf_rejects_bad_params(tmp_path):
    cfg, params = _random_encoder(0)
    with pytest.raises(ValueError, match="layers_1/fc1/kernel has shape"):
        bad = jax.tree.map(lambda x: x, params)
        bad["layers_1"]["fc1"]["kernel"] = bad["layers_1"]["fc1"]["kernel"][:, :-1]
        whisper.save_hf(tmp_path, cfg, bad)
    with pytest.raises(ValueError, match="no layer_norm/bias"):
        bad = jax.tree.map(lambda x: x, params)
        del bad["layer_norm"]["bias"]
        whisper.save_hf(tmp_path, cfg, bad)
    with pytest.raises(ValueError, match="whole number of seconds"):
        whisper.save_hf(tmp_path, dataclasses.replace(cfg, max_source_positions=12), params)
