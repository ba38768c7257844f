"""Image preprocessing for the vision towers, in numpy, from a checkpoint's preprocessor_config.json.

Reproduces transformers' PIL-backed SiglipImageProcessor / CLIPImageProcessor step for step, so the
encoder sees the pixel values it was trained on: convert to RGB (transparency composited onto white),
resize with PIL (fixed height x width, or shortest edge), center crop, rescale (in float64, then fp32),
normalize (fp32). Pillow is an optional dependency (the `multimodal` extra).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

try:
    from PIL import Image
except ImportError:  # Pillow is optional: only image decoding and resizing need it
    Image = None

_IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_BICUBIC = 3
# The class defaults of transformers' image processors, for configs that leave fields out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "siglip": dict(do_resize=True, size={"height": 224, "width": 224}, resample=_BICUBIC, do_center_crop=False,
                   crop_size=None, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                   image_mean=_IMAGENET_STANDARD[0], image_std=_IMAGENET_STANDARD[1], do_convert_rgb=True),
    "clip": dict(do_resize=True, size={"shortest_edge": 224}, resample=_BICUBIC, do_center_crop=True,
                 crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                 do_normalize=True, image_mean=_OPENAI_CLIP[0], image_std=_OPENAI_CLIP[1], do_convert_rgb=True),
}
_PROCESSOR_TYPES = {"SiglipImageProcessor": "siglip", "CLIPImageProcessor": "clip"}
ImageInput = Union[str, os.PathLike, np.ndarray, "Image.Image"]


def _require_pil() -> None:
    if Image is None:
        raise ImportError('decoding and resizing images needs Pillow: pip install -e ".[multimodal]" '
                          "(or pip install pillow)")


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing steps of one checkpoint; sizes are (height, width) or a shortest edge."""

    resize_to: tuple[int, int] | None = (224, 224)  # fixed (height, width) resize
    shortest_edge: int | None = None  # or: resize so the shorter side has this length, keeping aspect
    resample: int = _BICUBIC  # a PIL resampling filter (PIL.Image.Resampling value)
    crop_to: tuple[int, int] | None = None  # center crop (height, width)
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = _IMAGENET_STANDARD[0]
    image_std: tuple[float, ...] | None = _IMAGENET_STANDARD[1]
    do_convert_rgb: bool = True


def _size_dict(value: Any, name: str, source: str, square: bool) -> dict[str, int]:
    """transformers' get_size_dict: an int is a shortest edge (or a square when `square`), a pair (h, w)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    raise ValueError(f"{source}: field {name!r} must be an int, [height, width] or a dict, got {value!r}")


def processor_config(source: str | os.PathLike | dict[str, Any]) -> ImageProcessorConfig:
    """Reads a preprocessor_config.json (a checkpoint directory, the file itself, or its parsed dict)."""
    where = "preprocessor_config"
    if not isinstance(source, dict):
        file = Path(source)
        file = file / "preprocessor_config.json" if file.is_dir() else file
        where = str(file)
        if not file.exists():
            raise FileNotFoundError(f"{file}: no such file (the checkpoint's image preprocessing settings)")
        try:
            source = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from e
    kind = source.get("image_processor_type") or source.get("feature_extractor_type")
    if not kind:
        raise ValueError(f"{where}: needs 'image_processor_type' (or the older 'feature_extractor_type') "
                         f"to know the processor's defaults; expected one of {sorted(_PROCESSOR_TYPES)}")
    base = str(kind).removesuffix("Fast").removesuffix("Pil").replace("FeatureExtractor", "ImageProcessor")
    if base not in _PROCESSOR_TYPES:
        raise ValueError(f"{where}: image_processor_type {kind!r} is not supported; expected one of "
                         f"{sorted(_PROCESSOR_TYPES)} (SigLIP2 NaFlex processors are not supported)")
    fields = {**_DEFAULTS[_PROCESSOR_TYPES[base]], **{k: v for k, v in source.items() if v is not None}}
    resize_to = shortest_edge = crop_to = None
    if fields["do_resize"]:
        size = _size_dict(fields["size"], "size", where, square=False)
        if "height" in size and "width" in size:
            resize_to = (int(size["height"]), int(size["width"]))
        elif set(size) == {"shortest_edge"}:
            shortest_edge = int(size["shortest_edge"])
        else:
            raise ValueError(f"{where}: size {size!r} is not supported; expected height and width, "
                             "or shortest_edge alone")
    if fields["do_center_crop"]:
        crop = _size_dict(fields["crop_size"], "crop_size", where, square=True)
        if "height" not in crop or "width" not in crop:
            raise ValueError(f"{where}: crop_size must give height and width, got {crop!r}")
        crop_to = (int(crop["height"]), int(crop["width"]))
    mean, std = fields["image_mean"], fields["image_std"]
    return ImageProcessorConfig(
        resize_to=resize_to, shortest_edge=shortest_edge, resample=int(fields["resample"]), crop_to=crop_to,
        rescale_factor=float(fields["rescale_factor"]) if fields["do_rescale"] else None,
        image_mean=tuple(np.atleast_1d(mean).tolist()) if fields["do_normalize"] else None,
        image_std=tuple(np.atleast_1d(std).tolist()) if fields["do_normalize"] else None,
        do_convert_rgb=bool(fields["do_convert_rgb"]))


def load_image(path: str | os.PathLike) -> "Image.Image":
    """Decodes an image file with Pillow."""
    _require_pil()
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode the image ({e})") from e


def to_rgb(image: ImageInput) -> np.ndarray:
    """An image as uint8 RGB [H, W, 3]: files are decoded, transparency is composited onto white."""
    _require_pil()
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, np.ndarray):
        channels = image.shape[-1] if image.ndim == 3 else 1
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
            raise ValueError(f"image arrays must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got "
                             f"{image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and channels == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected an image path, a PIL image or a uint8 array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side `edge` and the longer one scaled and truncated, as HF does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop of [H, W, C] to (height, width), zero-padding first where the image is smaller (as HF)."""
    h, w = image.shape[:2]
    if height > h or width > w:
        new_h, new_w = max(h, height), max(w, width)
        top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
        padded[top_pad:top_pad + h, left_pad:left_pad + w] = image
        top, left = (h - height) // 2 + top_pad, (w - width) // 2 + left_pad
        return padded[max(0, top):top + height, max(0, left):left + width]
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


def preprocess_one(image: ImageInput, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image -> pixel values [3, H, W] (float32)."""
    _require_pil()
    if cfg.do_convert_rgb:
        pixels = to_rgb(image)
    else:
        pixels = np.array(load_image(image) if isinstance(image, (str, os.PathLike)) else image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
    if cfg.resize_to is not None or cfg.shortest_edge is not None:
        h, w = pixels.shape[:2]
        size = cfg.resize_to or _shortest_edge_size(h, w, cfg.shortest_edge)
        squeezed = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        resized = np.array(Image.fromarray(squeezed).resize((size[1], size[0]), resample=cfg.resample))
        pixels = resized[..., None] if resized.ndim == 2 else resized
    if cfg.crop_to is not None:
        pixels = _center_crop(pixels, *cfg.crop_to)
    pixels = pixels.transpose(2, 0, 1)  # [C, H, W]
    if cfg.rescale_factor is not None:
        pixels = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.image_mean is not None:
        pixels = pixels if np.issubdtype(pixels.dtype, np.floating) else pixels.astype(np.float32)
        channels = pixels.shape[0]
        mean = np.broadcast_to(np.asarray(cfg.image_mean, pixels.dtype), (channels,))[:, None, None]
        std = np.broadcast_to(np.asarray(cfg.image_std, pixels.dtype), (channels,))[:, None, None]
        pixels = (pixels - mean) / std
    return pixels.astype(np.float32)


def preprocess(images: ImageInput | Sequence[ImageInput], cfg: ImageProcessorConfig) -> np.ndarray:
    """Images (paths, PIL images or uint8 arrays) -> pixel_values [B, 3, H, W] (float32)."""
    if isinstance(images, (str, os.PathLike, np.ndarray)) or (Image is not None and isinstance(images, Image.Image)):
        images = [images]
    batch = [preprocess_one(image, cfg) for image in images]
    shapes = {b.shape for b in batch}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images differ in shape {sorted(shapes)}; the config resizes to no "
                         "fixed size (set size height/width or a center crop)")
    return np.stack(batch)
