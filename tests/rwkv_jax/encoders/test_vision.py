"""SigLIP / CLIP vision towers and their image preprocessing against transformers (torch, CPU, fp32).

Tiny random models are created with transformers and saved with save_pretrained (full models with their
text tower, vision-only ones, one sharded), then loaded by `rwkv_jax.encoders.load`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from jaxrl_peft.infra import mesh as mesh_lib  # noqa: E402
from jaxrl_peft.models.safetensors_io import CheckpointError  # noqa: E402
from jaxrl_peft.peft import registry  # noqa: E402
from rwkv_jax import encoders  # noqa: E402
from rwkv_jax.encoders import image as image_lib  # noqa: E402
from rwkv_jax.encoders import vit  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=30, patch_size=6)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)
TOL = 1e-4
ONE_PER_ARCH = ("siglip_full", "clip_vision_sharded")

# name -> factory of a tiny random transformers model ("sharded" ones are saved in several files)
VARIANTS = {
    "siglip_full": lambda: transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)),
    "siglip_vision": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
    "clip_full": lambda: transformers.CLIPModel(
        transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
    "clip_vision_sharded": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
}


def _vision_tower(model):
    """The transformers module whose last_hidden_state ModRWKV uses."""
    return model.vision_model if hasattr(model, "vision_model") else model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
    """(name, torch model, checkpoint directory) for one tiny random model."""
    torch.manual_seed(sorted(VARIANTS).index(request.param))
    model = VARIANTS[request.param]().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped weight cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name or "layrnorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    kwargs = {"max_shard_size": "20KB"} if "sharded" in request.param else {}
    model.save_pretrained(path, **kwargs)
    return request.param, model, path


def _pixels(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, VISION["image_size"], VISION["image_size"])) \
        .astype(np.float32)


def _reference(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _vision_tower(model)(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()


def test_features_match_transformers(saved):
    name, model, path = saved
    if "sharded" in name:
        assert (path / "model.safetensors.index.json").exists()
    encoder, params = encoders.load(path)
    assert isinstance(encoder, vit.VisionEncoder)
    assert encoder.cfg.arch == name.split("_")[0]
    pixels = _pixels(1)
    ours = np.asarray(jax.jit(encoder.apply)({"params": params}, pixels))
    ref = _reference(model, pixels)
    grid = (VISION["image_size"] // VISION["patch_size"]) ** 2
    assert ours.shape == ref.shape == (2, grid + (1 if encoder.cfg.arch == "clip" else 0), VISION["hidden_size"])
    assert np.abs(ours - ref).max() <= TOL
    assert "text_model" not in params and "head" not in params  # only the vision tower is kept


@pytest.mark.parametrize("saved", ONE_PER_ARCH, indirect=True)
def test_bf16_params_stay_close(saved):
    _, model, path = saved
    encoder, params = encoders.load(path, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    pixels = _pixels(2)
    ours = np.asarray(encoder.apply({"params": params}, pixels))
    ref = _reference(model, pixels)
    assert 0 < np.abs(ours - ref).max() < 0.1


@pytest.mark.parametrize("saved", ONE_PER_ARCH, indirect=True)
def test_sharded_matches_single_device(saved):
    _, _, path = saved
    encoder, params = encoders.load(path)
    mesh = mesh_lib.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
    _, sharded = encoders.load(path, mesh=mesh)
    kernel = sharded["layers_0"]["mlp"]["fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    pixels = _pixels(3)
    single = np.asarray(encoder.apply({"params": params}, pixels))
    np.testing.assert_allclose(np.asarray(encoder.apply({"params": sharded}, pixels)), single, atol=1e-5)


def test_lora_on_encoder_matches_hf_peft(saved):
    hf_peft = pytest.importorskip("peft")
    name, model, path = saved
    encoder, params = encoders.load(path)
    method = registry.get("lora", r=4, alpha=8, target_modules=("q_proj",))
    params, adapter = registry.init_adapter(method, jax.random.key(0), params)
    assert sorted(adapter) == ["layers_0", "layers_1"]
    rng = np.random.default_rng(4)
    for layer in adapter.values():
        q = layer["self_attn"]["q_proj"]
        q["lora_b"] = jnp.asarray(rng.normal(scale=0.3, size=q["lora_b"].shape), jnp.float32)
    adapted = encoder.clone(peft=method)
    pixels = _pixels(5)
    ours = np.asarray(adapted.apply({"params": params, "adapter": adapter}, pixels))
    base = np.asarray(encoder.apply({"params": params}, pixels))
    assert np.abs(ours - base).max() > 1e-2

    peft_model = hf_peft.get_peft_model(_vision_tower(model), hf_peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=True))
    with torch.no_grad():
        for module_name, module in peft_model.named_modules():
            if module_name.endswith("self_attn.q_proj") and hasattr(module, "lora_A"):
                layer = "layers_" + module_name.split("layers.")[1].split(".")[0]
                q = adapter[layer]["self_attn"]["q_proj"]
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(q["lora_a"]).T.copy()))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(q["lora_b"]).T.copy()))
        ref = peft_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    peft_model.unload()
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("vision_only", [False, True])
def test_naflex_siglip2_is_rejected(vision_only, tmp_path):
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, patch_size=6,
                  num_patches=16)
    if vision_only:
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vision))
    else:
        model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=TEXT, vision_config=vision))
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="NaFlex"):
        encoders.load(tmp_path)


def test_checkpoint_errors_name_the_tensor(saved, tmp_path):
    _, _, path = saved
    config = json.loads((path / "config.json").read_text())
    vision = config.get("vision_config", config)
    for layers, message in ((3, r"missing tensor '(vision_model\.)?encoder\.layers\.2\."),
                            (1, r"unexpected vision tensors \['(vision_model\.)?encoder\.layers\.1\.")):
        for f in path.iterdir():
            (tmp_path / f.name).write_bytes(f.read_bytes())
        vision["num_hidden_layers"] = layers
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            encoders.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert' is not a supported encoder"):
        encoders.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# image preprocessing

def _images(tmp_path):
    """Non-square odd-sized images in several modes, one of them as a PNG file."""
    rng = np.random.default_rng(7)
    rgb = PIL_Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8))
    tall = PIL_Image.fromarray(rng.integers(0, 256, (61, 29, 3), np.uint8))
    gray = PIL_Image.fromarray(rng.integers(0, 256, (45, 31), np.uint8))
    rgba = PIL_Image.fromarray(rng.integers(0, 256, (33, 47, 4), np.uint8), mode="RGBA")
    rgb.save(tmp_path / "rgb.png")
    return [rgb, tall, gray, rgba], [tmp_path / "rgb.png", tall, np.asarray(gray), rgba]


PROCESSORS = {
    "siglip": lambda: transformers.SiglipImageProcessorPil(size={"height": 30, "width": 30}),
    "siglip_bilinear_nonsquare": lambda: transformers.SiglipImageProcessorPil(
        size={"height": 24, "width": 36}, resample=2, image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7]),
    "clip": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 27},
                                                       crop_size={"height": 25, "width": 23}),
    "clip_crop_pads": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 21},
                                                                 crop_size={"height": 30, "width": 30}),
}


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_preprocessing_matches_transformers(kind, tmp_path):
    processor = PROCESSORS[kind]()
    processor.save_pretrained(tmp_path)
    hf_images, our_images = _images(tmp_path)
    ref = processor(hf_images, return_tensors="np")["pixel_values"]
    cfg = image_lib.processor_config(tmp_path)
    ours = image_lib.preprocess(our_images, cfg)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-6
    single = image_lib.preprocess(hf_images[1], cfg)
    assert single.shape == (1,) + ref.shape[1:]
    np.testing.assert_array_equal(single[0], ours[1])


def test_preprocessing_defaults_and_old_int_sizes():
    siglip = image_lib.processor_config({"image_processor_type": "SiglipImageProcessor"})
    assert siglip.resize_to == (224, 224) and siglip.crop_to is None and siglip.image_mean == (0.5, 0.5, 0.5)
    # openai/clip-vit-large-patch14 style: an old feature extractor with int sizes
    clip = image_lib.processor_config({"feature_extractor_type": "CLIPFeatureExtractor", "size": 224,
                                       "crop_size": 224})
    assert clip.shortest_edge == 224 and clip.crop_to == (224, 224) and clip.image_std[0] == 0.26862954
    with pytest.raises(ValueError, match="image_processor_type"):
        image_lib.processor_config({"size": 224})
    with pytest.raises(ValueError, match="Siglip2ImageProcessor"):
        image_lib.processor_config({"image_processor_type": "Siglip2ImageProcessor"})


def test_missing_pillow_names_the_extra(monkeypatch):
    monkeypatch.setattr(image_lib, "Image", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[multimodal\]"'):
        image_lib.preprocess(np.zeros((4, 4, 3), np.uint8), image_lib.ImageProcessorConfig())
