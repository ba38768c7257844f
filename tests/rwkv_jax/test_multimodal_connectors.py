"""ModRWKV connectors and checkpoint layouts against torch re-implementations of the reference modules.

The torch modules below are written from JL-er/WorldRWKV: `VisualAdapter` of world/encoder/siglip_encoder.py
at f15e179 (paper era, hidden 2C, `proj` Sequential), `VisualAdapter` of world/projector/test.py at HEAD
(hidden 4C, `mlp` Sequential, optional `conv`), `SpeechAdapter` of world/encoder/speech_encoder.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as tnn
import transformers

from jaxrl_peft.peft import registry
from rwkv_jax import multimodal as mm
from rwkv_jax.model import RWKV7Config, detect_config, official_shapes

ENC_DIM, LM_DIM = 24, 16


class PaperVisualAdapter(tnn.Module):
    def __init__(self, encoder_dim, project_dim):
        super().__init__()
        self.pre_norm = tnn.LayerNorm(project_dim)
        self.proj = tnn.Sequential(tnn.Linear(encoder_dim, 2 * project_dim), tnn.ReLU(),
                                   tnn.Linear(2 * project_dim, project_dim))

    def forward(self, x):
        x = self.proj(x)
        return x + self.pre_norm(x)


class LaterVisualAdapter(tnn.Module):
    def __init__(self, encoder_dim, project_dim, use_conv=False):
        super().__init__()
        self.use_conv = use_conv
        self.pre_norm = tnn.LayerNorm(project_dim)
        self.mlp = tnn.Sequential(tnn.Linear(encoder_dim, 4 * project_dim), tnn.ReLU(),
                                  tnn.Linear(4 * project_dim, project_dim))
        if use_conv:
            self.conv = tnn.Conv1d(encoder_dim, encoder_dim, bias=False, kernel_size=3, stride=2)

    def forward(self, x):
        if self.use_conv:
            x = self.conv(x.permute(0, 2, 1)).permute(0, 2, 1)
        x = self.mlp(x)
        return x + self.pre_norm(x)


class SpeechAdapter(tnn.Module):
    def __init__(self, encoder_dim, project_dim):
        super().__init__()
        hidden = 2 * project_dim
        self.conv = tnn.Conv1d(encoder_dim, hidden, kernel_size=3, stride=2, padding=2)
        self.proj = tnn.Sequential(tnn.Linear(hidden, hidden), tnn.ReLU(), tnn.Linear(hidden, project_dim))

    def forward(self, x):
        x = self.conv(x.permute(0, 2, 1)).permute(0, 2, 1)
        return self.proj(x)


def _randomised(module: tnn.Module, seed: int) -> tnn.Module:
    """The module with every tensor random (LayerNorm gains and biases included, so none is trivial)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.eval()


def _state(module: tnn.Module, prefix: str) -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _features(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, length, ENC_DIM)).astype(np.float32)


def _torch_out(module: tnn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_paper_era_vision_adapter_matches_reference():
    ref = _randomised(PaperVisualAdapter(ENC_DIM, LM_DIM), 0)
    ckpt = mm.import_reference(_state(ref, mm.PAPER_ADAPTER))
    assert (ckpt.layout, ckpt.modality, ckpt.compressor) == ("paper", "vision", None)
    x = _features(2, 11, 1)
    ours = mm.VisionAdapter(LM_DIM, hidden_ratio=2).apply({"params": ckpt.adapter}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), _torch_out(ref, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_conv", [False, True])
def test_later_vision_adapter_and_compressor_match_reference(use_conv):
    ref = _randomised(LaterVisualAdapter(ENC_DIM, LM_DIM, use_conv), 2)
    ckpt = mm.import_reference(_state(ref, mm.LATER_PROJ))  # a projector-only file
    assert (ckpt.layout, ckpt.modality) == ("later", "vision")
    assert (ckpt.compressor is not None) == use_conv
    length = 576 if use_conv else 13
    x = jnp.asarray(_features(2, length, 3))
    if use_conv:
        x = mm.VisionCompressor().apply({"params": ckpt.compressor}, x)
        assert x.shape == (2, mm.compressed_length(576), ENC_DIM) == (2, 287, ENC_DIM)
    ours = mm.VisionAdapter(LM_DIM).apply({"params": ckpt.adapter}, x)
    np.testing.assert_allclose(np.asarray(ours), _torch_out(ref, np.asarray(_features(2, length, 3))),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("frames", [1, 2, 37, 50])
def test_audio_adapter_matches_reference(frames):
    ref = _randomised(SpeechAdapter(ENC_DIM, LM_DIM), 4)
    ckpt = mm.import_reference(_state(ref, mm.PAPER_ADAPTER))
    assert (ckpt.layout, ckpt.modality) == ("paper", "audio")
    x = _features(2, frames, 5)
    ours = mm.AudioAdapter(LM_DIM).apply({"params": ckpt.adapter}, jnp.asarray(x))
    expected = _torch_out(ref, x)
    assert ours.shape == expected.shape == (2, mm.audio_adapter_length(frames), LM_DIM)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)


def test_connectors_init_the_reference_shapes():
    x = jnp.zeros((1, 9, ENC_DIM))
    for ours, ref, modality in [(mm.VisionAdapter(LM_DIM), LaterVisualAdapter(ENC_DIM, LM_DIM), "vision"),
                                (mm.AudioAdapter(LM_DIM), SpeechAdapter(ENC_DIM, LM_DIM), "audio")]:
        params = ours.init(jax.random.key(0), x)["params"]
        exported = mm.export_reference(mm.ReferenceCheckpoint({}, params, None, {}, "later", modality))
        prefix = mm.LATER_PROJ if modality == "vision" else mm.LATER_AUDIO_ADAPTER
        assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in _state(ref, prefix).items()}
    compressor = mm.VisionCompressor().init(jax.random.key(0), x)["params"]
    assert nn.unbox(compressor)["conv"]["kernel"].shape == (3 * ENC_DIM, ENC_DIM)


def _rwkv_tensors(dtype=np.float32) -> dict[str, np.ndarray]:
    config = RWKV7Config(vocab_size=32, n_embd=LM_DIM, n_layer=2, head_size=8, dim_ffn=64, decay_lora=4,
                         iclr_lora=4, value_lora=4, gate_lora=4)
    rng = np.random.default_rng(7)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in official_shapes(config).items()}


def _encoder_tensors(dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    names = {"embeddings.patch_embedding.weight": (ENC_DIM, 3, 4, 4), "embeddings.patch_embedding.bias": (ENC_DIM,),
             "encoder.layers.0.self_attn.q_proj.weight": (ENC_DIM, ENC_DIM), "post_layernorm.weight": (ENC_DIM,)}
    return {k: rng.standard_normal(s).astype(dtype) for k, s in names.items()}


def _reference_state(layout: str, modality: str, compressor: bool, dtype) -> dict[str, np.ndarray]:
    if modality == "vision":
        ref = (PaperVisualAdapter(ENC_DIM, LM_DIM) if layout == "paper"
               else LaterVisualAdapter(ENC_DIM, LM_DIM, use_conv=compressor))
        connector = _state(_randomised(ref, 9), mm.PAPER_ADAPTER if layout == "paper" else mm.LATER_PROJ)
    else:
        connector = _state(_randomised(SpeechAdapter(ENC_DIM, LM_DIM), 9),
                           mm.PAPER_ADAPTER if layout == "paper" else mm.LATER_AUDIO_ADAPTER)
    if layout == "paper" and compressor:
        torch.manual_seed(10)
        connector[mm.PAPER_ADAPTER + "conv.weight"] = torch.randn(ENC_DIM, ENC_DIM, 3).numpy()
    llm = "" if layout == "paper" else mm.LATER_LLM
    enc = mm.PAPER_ENCODER if layout == "paper" else mm.LATER_ENCODER
    state = {llm + k: v for k, v in _rwkv_tensors().items()}
    state.update({enc + k: v for k, v in _encoder_tensors().items()})
    state.update(connector)
    return {k: v.astype(dtype) for k, v in state.items()}


@pytest.mark.parametrize("layout,modality,compressor,dtype", [
    ("paper", "vision", False, np.float32), ("paper", "vision", True, np.float32),
    ("paper", "audio", False, ml_dtypes.bfloat16), ("later", "vision", False, ml_dtypes.bfloat16),
    ("later", "vision", True, np.float32), ("later", "audio", False, np.float32)])
def test_reference_checkpoint_import_export_round_trip(layout, modality, compressor, dtype):
    state = _reference_state(layout, modality, compressor, dtype)
    ckpt = mm.import_reference(state, "ref.pth")
    assert (ckpt.layout, ckpt.modality, ckpt.compressor is not None) == (layout, modality, compressor)
    assert ckpt.rwkv.keys() == _rwkv_tensors().keys()
    assert detect_config(ckpt.rwkv, "ref.pth").n_layer == 2  # the RWKV part is what rwkv_jax.model reads
    assert ckpt.encoder.keys() == _encoder_tensors().keys()
    assert sorted(mm.encoder_hf_tensors(ckpt, "siglip"))[0].startswith("vision_model.embeddings.")
    back = mm.export_reference(ckpt)
    assert list(sorted(back)) == list(sorted(state))
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key].astype(np.float32), value.astype(np.float32), err_msg=key)


def test_reference_checkpoint_rejects_unknown_tensors():
    state = _reference_state("later", "vision", False, np.float32)
    with pytest.raises(ValueError, match="belong to no part"):
        mm.import_reference({**state, "extra.weight": np.zeros(3)}, "ref.pth")
    with pytest.raises(ValueError, match="unexpected vision adapter tensor 'mlp.4.weight'"):
        mm.import_reference({**state, "proj.mlp.4.weight": np.zeros((3, 3))}, "ref.pth")
    paper = _reference_state("paper", "vision", False, np.float32)
    with pytest.raises(ValueError, match="blocks_0"):
        mm.import_reference({**paper, "blocks_0.x": np.zeros(3)}, "ref.pth")


@pytest.mark.parametrize("module", [mm.VisionAdapter(LM_DIM), mm.AudioAdapter(LM_DIM), mm.VisionCompressor()])
def test_lora_reaches_every_connector_weight(module):
    """A LoRA adapter on the connector's Linears/convolutions changes the output exactly as merging does."""
    method = registry.get("lora", r=2, alpha=4.0, target_modules=("fc1", "fc2", "conv"))
    x = jnp.asarray(_features(2, 9, 11))
    params = nn.unbox(module.init(jax.random.key(0), x)["params"])
    bound = module.clone(peft=method)
    params, adapter = registry.init_adapter(method, jax.random.key(1), params)
    assert set(adapter) == set(params) - {"pre_norm"}
    adapter = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), adapter)
    adapted = jax.jit(bound.apply)({"params": params, "adapter": adapter}, x)
    merged = bound.apply({"params": registry.merge(method, params, adapter)}, x)
    assert np.abs(np.asarray(adapted) - np.asarray(module.apply({"params": params}, x))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), atol=1e-5, rtol=0)


def _tiny_hf_encoders():
    """type -> (the full HF model, the submodule the reference keeps as `model`), tiny and random."""
    vision = dict(hidden_size=ENC_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                  image_size=12, patch_size=6)
    text = dict(hidden_size=ENC_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    siglip = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    whisper = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=50, num_mel_bins=8, d_model=ENC_DIM, encoder_layers=1, encoder_attention_heads=4,
        encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=32,
        max_source_positions=6, max_target_positions=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))
    wavlm = transformers.WavLMModel(transformers.WavLMConfig(
        hidden_size=ENC_DIM, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        num_buckets=16, max_bucket_distance=20))
    # The reference's CLIPVisionModel (transformers 4) named its tensors `vision_model.*`, as CLIPModel does.
    return {"siglip": (siglip, siglip.vision_model), "clip": (clip, clip.vision_model),
            "whisper": (whisper, whisper.model.encoder), "speech": (wavlm, wavlm)}


def test_encoder_tensors_get_their_hf_checkpoint_names():
    """The reference saves its encoder module's state dict; its HF names are those of the full HF model."""
    torch.manual_seed(0)
    for encoder_type, (full, kept) in _tiny_hf_encoders().items():
        state = _state(kept, mm.PAPER_ENCODER + ("vision_model." if encoder_type == "clip" else ""))
        state.update({k: v for k, v in _rwkv_tensors().items()})
        ckpt = mm.import_reference(state, encoder_type)
        assert mm.detect_encoder_type(ckpt.encoder) == encoder_type
        hf = mm.encoder_hf_tensors(ckpt)
        full_state = {k: v.detach().numpy() for k, v in full.state_dict().items()}
        assert len(hf) == len(ckpt.encoder) and set(hf) <= set(full_state), encoder_type
        for name, value in hf.items():
            np.testing.assert_array_equal(value, full_state[name], err_msg=name)
