"""vit.save_hf / save_preprocessor write real HF SigLIP vision checkpoints: transformers loads them with
the same features and image preprocessing, and our loader reads them back bit for bit."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from rwkv_jax import encoders  # noqa: E402
from rwkv_jax.encoders import image as image_lib  # noqa: E402
from rwkv_jax.encoders import vit  # noqa: E402

CFG = vit.VisionConfig(arch="siglip", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       image_size=24, patch_size=6, layer_norm_eps=1e-6)


def _random_params(seed: int) -> dict:
    """A random tower whose biases and norms are far from their init, so a swapped or transposed weight
    (or a dropped bias) changes the features."""
    params = vit.init_params(CFG, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) + rng.normal(0, 0.3, np.shape(x))).astype(np.float32), params)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    params = _random_params(0)
    vit.save_hf(path, CFG, params)
    vit.save_preprocessor(path, CFG.image_size)
    return path, params


def _pixels(seed: int, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, CFG.image_size, CFG.image_size)).astype(np.float32)


def test_transformers_loads_it_with_the_same_features(saved):
    path, params = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "siglip_vision_model" and config["vision_use_head"] is False
    model, info = transformers.SiglipVisionModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixels = _pixels(1)
    with torch.no_grad():
        ref = model.eval()(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    ours = np.asarray(vit.VisionEncoder(CFG).apply({"params": params}, pixels))
    assert ours.shape == ref.shape == (3, CFG.num_patches, CFG.hidden_size)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ref).max() > 0.5  # features of some size: the comparison means something


def test_our_loader_reads_it_back_bit_exact(saved):
    path, params = saved
    encoder, loaded = encoders.load(path)
    assert encoder.cfg.replace(dtype="float32", param_dtype="float32") == CFG
    flat_saved = dict(vit._paths(params))
    flat_loaded = dict(vit._paths(jax.tree.map(np.asarray, loaded)))
    assert flat_saved.keys() == flat_loaded.keys()
    for key, value in flat_saved.items():
        np.testing.assert_array_equal(flat_loaded[key], value, err_msg="/".join(key))
    pixels = _pixels(2)
    np.testing.assert_array_equal(np.asarray(encoder.apply({"params": loaded}, pixels)),
                                  np.asarray(vit.VisionEncoder(CFG).apply({"params": params}, pixels)))


def test_preprocessor_config_matches_siglip_image_processor(saved):
    path, _ = saved
    processor = transformers.SiglipImageProcessorPil.from_pretrained(path)
    assert processor.size == {"height": CFG.image_size, "width": CFG.image_size}
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (CFG.image_size, CFG.image_size, 3), np.uint8),  # already at size
              rng.integers(0, 256, (37, 29, 3), np.uint8)]  # resized (bicubic)
    ref = processor([PIL_Image.fromarray(i) for i in images], return_tensors="np")["pixel_values"]
    ours = image_lib.preprocess(images, image_lib.processor_config(path))
    assert ours.shape == ref.shape == (2, 3, CFG.image_size, CFG.image_size)
    assert np.abs(ours - ref).max() <= 1e-6
    expected = (images[0].transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5  # no resize, rescale, 0.5
    assert np.abs(ours[0] - expected).max() <= 1e-6


def test_bad_inputs_are_refused(tmp_path):
    params = _random_params(1)
    with pytest.raises(ValueError, match="only SigLIP"):
        vit.save_hf(tmp_path, CFG.replace(arch="clip"), params)
    del params["post_layernorm"]
    with pytest.raises(ValueError, match="missing.*post_layernorm"):
        vit.save_hf(tmp_path, CFG, params)
    with pytest.raises(ValueError, match="has shape"):
        vit.save_hf(tmp_path, CFG.replace(intermediate_size=40), _random_params(1))
