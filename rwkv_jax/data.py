"""ModRWKV's data layer: conversation records with images / audio, their model inputs, grain pipelines,
an encoder-feature cache, and the synthetic tasks of the tiny embedded defaults.

Records (`MultimodalRecord`) come from LLaVA-format JSON / JSONL, audio-transcript manifests, the
LibriSpeech directory layout, a prepared tfds `librispeech`, or the synthetic generators. `prepare`
turns one record into fixed-shape arrays (tokens, modality mask, next-token targets, preprocessed
images / audio padded to a fixed item count); a record it cannot use raises `BadRecord`, which the
pipeline counts in `MultimodalPipeline.stats`, logs once with the record's `source` (file:line) and
skips. `MultimodalPipeline` shards records by JAX process, reshuffles each epoch from a seed, prepares
in grain worker processes when asked, and batches; its iterators save and restore their position.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import wave
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from jaxrl_peft.data.pipeline import process_shard
from rwkv_jax import multimodal as mm
from rwkv_jax.encoders import audio as audio_lib
from rwkv_jax.encoders import image as image_lib
from rwkv_jax.tokenizer import world_tokenizer

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000
AUDIO_MARKER = "<audio>"
IMAGE_MARKER = "<image>"
# The user turn of a transcription conversation. The reference trains ASR with no user turn at all
# (`\x16Assistant: {transcript}\x17` after the prepended audio); pass instruction=None for that.
ASR_INSTRUCTION = "Transcribe the audio."
# WavLM's feature-extractor convolutions (kernel, stride): 20 ms frames (WavLMEncoderConfig defaults).
WAVLM_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))

Item = str | os.PathLike | np.ndarray

# -------------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass
class MultimodalRecord:
    """One training conversation and its modality items, in the order their markers appear.

    conversation: LLaVA turns [{'from': 'human'|'gpt'|'user'|'assistant', 'value': text}].
    images: image file paths or uint8 arrays [H, W, 3]. audio: audio file paths or float arrays [samples]
    at 16 kHz. source: where the record came from ('file:line', 'file[index]' for a JSON array).
    """

    conversation: list[dict[str, str]]
    images: list[Item] = dataclasses.field(default_factory=list)
    audio: list[Item] = dataclasses.field(default_factory=list)
    source: str = ""


def asr_conversation(transcript: str, instruction: str | None = ASR_INSTRUCTION,
                     marker: str = AUDIO_MARKER) -> list[dict[str, str]]:
    """user: marker + instruction, assistant: transcript; instruction None: the reference's assistant turn only."""
    if instruction is None:
        return [{"from": "gpt", "value": transcript}]
    return [{"from": "human", "value": f"{marker}\n{instruction}"}, {"from": "gpt", "value": transcript}]


def _json_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """(source, object) of each record of a JSON array file ('path[i]') or a JSONL file ('path:line')."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        for index, obj in enumerate(items):
            yield f"{path}[{index}]", obj
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON ({e})") from e


def _conversation(value: Any, source: str) -> list[dict[str, str]]:
    """A checked copy of a LLaVA 'conversations' list."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    turns = []
    for index, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise ValueError(f"{source}: turn {index} of 'conversations' must be an object with string 'from' "
                             f"and 'value', got {turn!r}")
        turns.append({"from": turn["from"], "value": turn["value"]})
    return turns


def read_llava(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> list[MultimodalRecord]:
    """LLaVA records from a JSON array or JSONL file: `conversations` and an optional `image` (a path or a
    list of paths, relative to `image_folder`, default the file's folder). Records without `image` are
    text-only. A malformed record raises, naming file:line (or file[index])."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    records = []
    for source, obj in _json_objects(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: expected a JSON object with 'conversations', got {type(obj).__name__}")
        if "conversations" not in obj:
            raise ValueError(f"{source}: no 'conversations' field")
        images = obj.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ValueError(f"{source}: 'image' must be a path or a list of paths, got {obj.get('image')!r}")
        records.append(MultimodalRecord(_conversation(obj["conversations"], source),
                                        [str(folder / i) for i in images], [], source))
    return records


def read_audio_manifest(path: str | os.PathLike, audio_folder: str | os.PathLike | None = None,
                        instruction: str | None = ASR_INSTRUCTION) -> list[MultimodalRecord]:
    """Transcription records from a JSONL manifest of {"audio": path, "text": transcript}; paths relative
    to `audio_folder` (default the manifest's folder)."""
    path = Path(path)
    folder = Path(audio_folder) if audio_folder is not None else path.parent
    records = []
    for source, obj in _json_objects(path):
        if not (isinstance(obj, dict) and isinstance(obj.get("audio"), str) and isinstance(obj.get("text"), str)):
            raise ValueError(f"{source}: expected an object with string fields 'audio' (a path) and 'text'")
        records.append(MultimodalRecord(asr_conversation(obj["text"], instruction), [],
                                        [str(folder / obj["audio"])], source))
    return records


def read_librispeech(root: str | os.PathLike, instruction: str | None = ASR_INSTRUCTION,
                     lowercase: bool = True) -> list[MultimodalRecord]:
    """Transcription records of a LibriSpeech tree: every `<spk>/<chapter>/<spk>-<chapter>.trans.txt`
    under `root` (lines 'UTTERANCE-ID TRANSCRIPT', audio `<UTTERANCE-ID>.flac` beside it). Transcripts
    are lower-cased by default, as the reference's WER script compares them."""
    root = Path(root)
    listings = sorted(root.rglob("*.trans.txt"))
    if not listings:
        raise FileNotFoundError(f"{root}: no LibriSpeech '*.trans.txt' files under it")
    records = []
    for listing in listings:
        with open(listing, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                utterance, _, text = line.strip().partition(" ")
                if not text:
                    raise ValueError(f"{listing}:{number}: expected 'UTTERANCE-ID TRANSCRIPT', got {line.strip()!r}")
                text = text.lower() if lowercase else text
                records.append(MultimodalRecord(asr_conversation(text, instruction), [],
                                                [str(listing.parent / f"{utterance}.flac")], f"{listing}:{number}"))
    return records


class TfdsLibriSpeech(Sequence):
    """Random-access transcription records of a split of an already prepared tfds `librispeech`
    (ArrayRecord files under `data_dir`, default $TFDS_DATA_DIR or ~/tensorflow_datasets). Never downloads."""

    def __init__(self, split: str, data_dir: str | os.PathLike | None = None,
                 instruction: str | None = ASR_INSTRUCTION, lowercase: bool = True):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("TfdsLibriSpeech needs tensorflow-datasets: pip install tensorflow-datasets") from e
        data_dir = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")
        prepared = sorted(p.parent for p in (data_dir / "librispeech").glob("*/*/dataset_info.json"))
        if not prepared:
            raise FileNotFoundError(
                f"{data_dir / 'librispeech'}: no prepared tfds librispeech (looked for */*/dataset_info.json); "
                "this reader never downloads: prepare it with `tfds build librispeech --file_format=array_record "
                f"--data_dir={data_dir}`, or read the LibriSpeech folders with read_librispeech")
        try:
            builder = tfds.builder_from_directory(os.fspath(prepared[-1]))
        except ImportError as e:
            raise ImportError(f"{prepared[-1]}: tfds decodes its Audio feature with TensorFlow ({e}): pip install "
                              "tensorflow-cpu, or read the LibriSpeech folders with read_librispeech") from e
        if split not in builder.info.splits:
            raise ValueError(f"{prepared[-1]}: no split {split!r}; it has {sorted(builder.info.splits)}")
        try:
            self._source = builder.as_data_source(split=split)
        except Exception as e:  # tfds raises several types for a non-ArrayRecord preparation
            raise ValueError(f"{prepared[-1]}: cannot open split {split!r} for random access ({e}); prepare it "
                             "with --file_format=array_record") from e
        self._where = f"{prepared[-1]}:{split}"
        self.instruction, self.lowercase = instruction, lowercase

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> MultimodalRecord:
        example = self._source[index]
        text = example["text"]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        speech = np.asarray(example["speech"])
        samples = speech.astype(np.float32) / 32768.0 if speech.dtype == np.int16 else speech.astype(np.float32)
        return MultimodalRecord(asr_conversation(text.lower() if self.lowercase else text, self.instruction), [],
                                [samples.reshape(-1)], f"{self._where}[{index}]")


# -------------------------------------------------------------------------------------------------
# From a record to model inputs


class BadRecord(ValueError):
    """A record `prepare` cannot use; `kind` names the reason class (counted in the pipeline's stats)."""

    def __init__(self, source: str, kind: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.kind, self.reason = source, kind, reason

    def __reduce__(self):
        return BadRecord, (self.source, self.kind, self.reason)


@dataclasses.dataclass(frozen=True)
class AdapterLengths:
    """Tokens one item gives after ModRWKV's connectors, from its encoder output length.

    Images: the encoder's tokens (VisionCompressor's count when `compress_images`); audio: AudioAdapter's
    stride-2 convolution of the encoder frames.
    """

    compress_images: bool = False

    def __call__(self, kind: str, length: int) -> int:
        if kind == "image":
            return mm.compressed_length(length) if self.compress_images else length
        if kind == "audio":
            return mm.audio_adapter_length(length)
        raise ValueError(f"AdapterLengths: unknown modality {kind!r}; expected 'image' or 'audio'")


def whisper_frames(samples: int, chunk_seconds: int = audio_lib.WHISPER_CHUNK_SECONDS) -> int:
    """Encoder frames ModRWKV keeps of a Whisper window (`chunk_seconds` long) holding `samples` samples:
    mask.sum() // 2 + 1."""
    window = audio_lib.whisper_mel_frames(chunk_seconds)
    mel_frames = min(-(-samples // audio_lib.WHISPER_HOP), window)
    return min(mel_frames // 2 + 1, window // 2)


def wavlm_frames(samples: int, conv: Sequence[tuple[int, int]] = WAVLM_CONV) -> int:
    """Encoder frames WavLM makes of `samples` samples: floor((L - kernel) / stride) + 1 per convolution."""
    for kernel, stride in conv:
        samples = (samples - kernel) // stride + 1
    return samples


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """How `prepare` turns records into fixed-shape model inputs.

    seq_len: T, the tokens per row (a conversation may hold T + 1 tokens: inputs and shifted targets).
    tokenizer: anything with `encode(str) -> list[int]`; None: the World tokenizer (built in each worker).
    image: the vision tower's preprocessing (`image.processor_config(path)`); None: records with images
        are rejected. image_encoder_tokens: encoder output tokens per image (VisionConfig.num_tokens).
    audio: 'whisper' (log-mel features [n_mels, 100 * whisper_chunk_seconds]) or 'wavlm' (raw values
        padded to max_audio_seconds); None: records with audio are rejected.
    whisper_chunk_seconds: the Whisper window (the checkpoint's preprocessor chunk_length, 30 s for
        OpenAI's); max_audio_seconds may not exceed it.
    modality_length: (kind, encoder tokens or frames) -> slots the item fills in the text, or an int per
        kind ({'image': 288}); default: ModRWKV's connectors without the vision compressor.
    truncate: cut a conversation longer than T + 1 tokens (when no modality slot and not every target is
        lost) instead of rejecting it.
    features: a filled `FeatureCache`: items give their cached encoder features (`image_features` /
        `audio_features` [max_items, N, D]) in place of the preprocessed encoder inputs (see
        `fill_feature_cache`); the files are still checked, an audio file still decoded for its length.
    """

    seq_len: int
    tokenizer: Any = None
    chat_format: mm.ChatFormat = mm.LATER
    image: image_lib.ImageProcessorConfig | None = None
    image_encoder_tokens: int | None = None
    max_images: int = 1
    audio: str | None = None
    n_mels: int = 80
    wavlm_normalize: bool = True
    wavlm_conv: tuple[tuple[int, int], ...] = WAVLM_CONV
    max_audio_seconds: float = float(audio_lib.WHISPER_CHUNK_SECONDS)
    whisper_chunk_seconds: int = audio_lib.WHISPER_CHUNK_SECONDS
    max_audio: int = 1
    max_audio_tokens: int | None = mm.MAX_AUDIO_TOKENS
    audio_marker: str = AUDIO_MARKER
    modality_length: Callable[[str, int], int] | Mapping[str, int] = AdapterLengths()
    truncate: bool = False
    features: FeatureCache | None = None

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"PrepareConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.image is not None:
            image_shape(self.image)
            if not self.image_encoder_tokens or self.image_encoder_tokens < 1:
                raise ValueError("PrepareConfig.image_encoder_tokens (the vision encoder's output tokens per "
                                 "image, VisionConfig.num_tokens) is required with an image config")
        if self.audio not in (None, "whisper", "wavlm"):
            raise ValueError(f"PrepareConfig.audio must be None, 'whisper' or 'wavlm', got {self.audio!r}")
        if self.audio == "whisper":
            audio_lib.whisper_mel_frames(self.whisper_chunk_seconds)  # raises on a bad chunk
            if self.max_audio_seconds > self.whisper_chunk_seconds:
                raise ValueError(f"PrepareConfig.max_audio_seconds={self.max_audio_seconds}: Whisper takes at most "
                                 f"whisper_chunk_seconds={self.whisper_chunk_seconds} s")
        if self.max_images < 1 or self.max_audio < 1:
            raise ValueError("PrepareConfig.max_images and max_audio must be >= 1")

    def slots(self, kind: str, encoder_length: int) -> int:
        """Tokens an item of `kind` fills in the text, from its encoder output length."""
        if isinstance(self.modality_length, Mapping):
            if kind not in self.modality_length:
                raise ValueError(f"PrepareConfig.modality_length has no entry for {kind!r}")
            return int(self.modality_length[kind])
        return int(self.modality_length(kind, encoder_length))

    def audio_samples(self) -> int:
        return int(round(self.max_audio_seconds * SAMPLING_RATE))

    def preprocessing(self) -> dict[str, Any]:
        """The settings that decide an item's encoder input (what a feature cache is keyed by)."""
        out: dict[str, Any] = {"image": self.image}
        if self.audio is not None:
            out.update(audio=self.audio, n_mels=self.n_mels, whisper_chunk_seconds=self.whisper_chunk_seconds,
                       wavlm_normalize=self.wavlm_normalize, max_audio_seconds=self.max_audio_seconds)
        return out


def image_shape(cfg: image_lib.ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) every preprocessed image has; raises when the config gives no fixed size."""
    if cfg.crop_to is not None:
        return cfg.crop_to
    if cfg.resize_to is not None:
        return cfg.resize_to
    raise ValueError("image preprocessing gives no fixed size (a shortest-edge resize without a center crop); "
                     "fixed-shape batches need size height/width or a crop_size")


def pixel_values(image: Item, cfg: image_lib.ImageProcessorConfig) -> np.ndarray:
    """image.preprocess_one, without Pillow for uint8 RGB arrays already at the target size (the synthetic task)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3 \
            and cfg.shortest_edge is None and cfg.resize_to in (None, image.shape[:2]) \
            and cfg.crop_to in (None, image.shape[:2]):
        pixels = image.transpose(2, 0, 1)  # [3, H, W]
        if cfg.rescale_factor is not None:
            pixels = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        pixels = pixels.astype(np.float32)
        if cfg.image_mean is not None:
            mean = np.broadcast_to(np.asarray(cfg.image_mean, np.float32), (3,))[:, None, None]
            std = np.broadcast_to(np.asarray(cfg.image_std, np.float32), (3,))[:, None, None]
            pixels = (pixels - mean) / std
        return pixels.astype(np.float32)
    return image_lib.preprocess_one(image, cfg)


def _read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """PCM-16 WAV with the standard library (reading other formats needs soundfile)."""
    with wave.open(os.fspath(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is readable without soundfile")
        frames = np.frombuffer(f.readframes(f.getnframes()), "<i2").reshape(-1, f.getnchannels())
        return (frames.astype(np.float32) / 32768.0).mean(axis=1), f.getframerate()


def load_audio(item: Item) -> np.ndarray:
    """Mono float32 samples at 16 kHz of a file (decoded, resampled) or of an array (taken as 16 kHz)."""
    if isinstance(item, np.ndarray):
        return np.asarray(item, np.float32).reshape(-1)
    if audio_lib.soundfile is None and str(item).lower().endswith(".wav"):
        try:
            samples, rate = _read_wav(item)
        except (wave.Error, EOFError) as e:
            raise ValueError(f"{item}: cannot decode audio ({e})") from e
    else:
        samples, rate = audio_lib.read_audio(item)
    if rate != SAMPLING_RATE:
        from scipy.signal import resample_poly  # scipy comes with jax

        g = math.gcd(rate, SAMPLING_RATE)
        samples = resample_poly(samples, SAMPLING_RATE // g, rate // g).astype(np.float32)
    return samples


def _image_item(item: Item, cfg: image_lib.ImageProcessorConfig, source: str) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)) and not os.path.exists(item):
        raise BadRecord(source, "missing_image", f"image {os.fspath(item)} does not exist")
    try:
        return pixel_values(item, cfg)
    except (ValueError, OSError, TypeError) as e:
        raise BadRecord(source, "bad_image", f"cannot use image {item if isinstance(item, str) else '<array>'}: {e}")


def _audio_samples(item: Item, config: PrepareConfig, source: str) -> tuple[np.ndarray, int]:
    """(samples, encoder frames) of one audio item, checked: readable, finite, not too long."""
    name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else "<array>"
    if isinstance(item, (str, os.PathLike)) and not os.path.exists(item):
        raise BadRecord(source, "missing_audio", f"audio {name} does not exist")
    try:
        samples = load_audio(item)
    except (ValueError, OSError) as e:
        raise BadRecord(source, "bad_audio", f"cannot read audio {name}: {e}")
    if samples.size == 0 or not np.all(np.isfinite(samples)):
        raise BadRecord(source, "bad_audio", f"audio {name} is empty or holds non-finite samples")
    if samples.size > config.audio_samples():
        raise BadRecord(source, "too_long", f"audio {name} lasts {samples.size / SAMPLING_RATE:.2f} s, more than "
                                            f"max_audio_seconds={config.max_audio_seconds}")
    if config.audio == "whisper":
        return samples, whisper_frames(samples.size, config.whisper_chunk_seconds)
    frames = wavlm_frames(samples.size, config.wavlm_conv)
    if frames < 1:
        raise BadRecord(source, "bad_audio", f"audio {name} has {samples.size} samples, too few for one WavLM frame")
    return samples, frames


def _audio_item(item: Item, config: PrepareConfig, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(encoder input, its mask, encoder frames) of one audio item."""
    samples, frames = _audio_samples(item, config, source)
    if config.audio == "whisper":
        features, mask = audio_lib.whisper_features(samples, config.n_mels, chunk_seconds=config.whisper_chunk_seconds)
        return features[0], mask[0], frames
    values, mask = audio_lib.wavlm_inputs(samples, config.wavlm_normalize)
    pad = config.audio_samples() - samples.size
    return np.pad(values[0], (0, pad)), np.pad(mask[0], (0, pad)), frames


def _cached(kind: str, item: Item, config: PrepareConfig, source: str) -> np.ndarray:
    """An item's features from config.features; a miss is an error (the cache is filled before training)."""
    features = config.features.get(kind, item)
    if features is None:
        if kind == "image":  # a bad item raises BadRecord here; a good one was simply never cached
            _image_item(item, config.image, source)
        else:
            _audio_item(item, config, source)
        raise FeatureCacheMiss(f"{source}: its {kind} is not in the feature cache {config.features.directory}; "
                               "fill the cache first (data.fill_feature_cache) with the same records")
    return features


def _stack_items(items: Sequence[np.ndarray], count: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """items padded with zeros to [count, *shape]."""
    out = np.zeros((count,) + tuple(shape), dtype)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _tokenizer(config: PrepareConfig) -> Any:
    """config.tokenizer, or the World tokenizer built once per process."""
    return config.tokenizer if config.tokenizer is not None else world_tokenizer()


def prepare(record: MultimodalRecord, config: PrepareConfig) -> dict[str, np.ndarray]:
    """A record's model inputs; raises BadRecord (naming record.source) when it cannot be used.

    Returns tokens [T] int32, modality_mask [T] bool (slots that take modality embeddings), targets [T]
    int32 (the next token, mm.IGNORE_INDEX where there is no loss; see mm.pack_for_training), and per
    configured modality, padded to the maximum item count:
      image: pixel_values [max_images, 3, H, W] f32, image_slots [max_images] i32 (text slots per image,
        0 = no item), image_count [] i32;
      audio: audio_inputs [max_audio, n_mels, 100 * whisper_chunk_seconds] (whisper) or [max_audio, samples]
        (wavlm) f32, audio_mask of the same shape without n_mels, i32, audio_frames [max_audio] i32 (valid encoder
        frames), audio_slots [max_audio] i32, audio_count [] i32.
    With config.features, image_features / audio_features [max_items, N, D] replace pixel_values and
    audio_inputs / audio_mask.
    Slots fill in item order: the first image_slots[0] True positions of the mask take image 0, and so on.
    """
    source = record.source or "<record>"
    if record.images and record.audio:
        raise BadRecord(source, "unsupported", "holds both images and audio; ModRWKV takes one modality per sample")
    kind = "image" if record.images else "audio" if record.audio else None
    out: dict[str, np.ndarray] = {}
    slots: dict[str, list[int]] = {"image": [], "audio": []}
    cache = config.features
    if config.image is not None:
        if cache is not None:
            for item in record.images:
                if isinstance(item, (str, os.PathLike)) and not os.path.exists(item):
                    raise BadRecord(source, "missing_image", f"image {os.fspath(item)} does not exist")
            pixels = [_cached("image", item, config, source) for item in record.images]
            out["image_features"] = _stack_items(pixels, config.max_images, cache.item_shape, cache.dtype)
        else:
            height, width = image_shape(config.image)
            pixels = [_image_item(item, config.image, source) for item in record.images]
            out["pixel_values"] = _stack_items(pixels, config.max_images, (3, height, width), np.float32)
        slots["image"] = [config.slots("image", config.image_encoder_tokens) for _ in pixels]
        out["image_slots"] = _stack_items(slots["image"], config.max_images, (), np.int32)
        out["image_count"] = np.asarray(len(pixels), np.int32)
    if config.audio is not None:
        if cache is not None:
            decoded = [(None, None, _audio_samples(item, config, source)[1]) for item in record.audio]
        else:
            decoded = [_audio_item(item, config, source) for item in record.audio]
        slots["audio"] = [config.slots("audio", frames) for _, _, frames in decoded]
        if config.max_audio_tokens is not None and any(n > config.max_audio_tokens for n in slots["audio"]):
            raise BadRecord(source, "too_long", f"audio gives {max(slots['audio'])} tokens, more than "
                                                f"max_audio_tokens={config.max_audio_tokens}")
        if cache is not None:
            out["audio_features"] = _stack_items([_cached("audio", item, config, source) for item in record.audio],
                                                 config.max_audio, cache.item_shape, cache.dtype)
        else:
            width = ((config.n_mels, audio_lib.whisper_mel_frames(config.whisper_chunk_seconds))
                     if config.audio == "whisper" else (config.audio_samples(),))
            out["audio_inputs"] = _stack_items([d[0] for d in decoded], config.max_audio, width, np.float32)
            out["audio_mask"] = _stack_items([d[1] for d in decoded], config.max_audio, width[-1:], np.int32)
        out["audio_frames"] = _stack_items([d[2] for d in decoded], config.max_audio, (), np.int32)
        out["audio_slots"] = _stack_items(slots["audio"], config.max_audio, (), np.int32)
        out["audio_count"] = np.asarray(len(decoded), np.int32)
    lengths = slots[kind] if kind else []
    if any(n < 1 for n in lengths):
        raise BadRecord(source, "bad_item", f"an item gives {min(lengths)} modality tokens; each needs at least 1")
    chat_format = config.chat_format
    if kind == "audio":
        chat_format = dataclasses.replace(chat_format, marker=config.audio_marker)
    try:
        example = mm.format_conversation(record.conversation, lengths, chat_format,
                                         _tokenizer(config))
    except ValueError as e:
        raise BadRecord(source, "format", str(e).removeprefix("format_conversation: "))
    if not (example.labels != mm.IGNORE_INDEX).any():
        raise BadRecord(source, "no_target", "has no assistant turn: nothing to train on")
    total = len(example.input_ids)
    if total > config.seq_len + 1 and not config.truncate:
        raise BadRecord(source, "too_long", f"has {total} tokens, more than seq_len + 1 = {config.seq_len + 1}")
    try:
        tokens, mask, targets = mm.pack_for_training(example, config.seq_len)
    except ValueError as e:
        raise BadRecord(source, "too_long", str(e).removeprefix("pack_for_training: "))
    if not (targets != mm.IGNORE_INDEX).any():
        raise BadRecord(source, "too_long", f"cutting its {total} tokens to seq_len + 1 = {config.seq_len + 1} "
                                            "leaves no target")
    return {"tokens": tokens.astype(np.int32), "modality_mask": mask.astype(bool),
            "targets": targets.astype(np.int32), **out}


# -------------------------------------------------------------------------------------------------
# The grain pipeline


@dataclasses.dataclass(frozen=True)
class _Rejected:
    """What a worker hands back for a record `prepare` refused (so counting and logging stay in one process)."""

    source: str
    kind: str
    reason: str


def _prepare_or_reject(record: MultimodalRecord, config: PrepareConfig) -> dict[str, np.ndarray] | _Rejected:
    try:
        return prepare(record, config)
    except BadRecord as e:
        return _Rejected(e.source, e.kind, e.reason)


@dataclasses.dataclass
class PipelineStats:
    """Records this pipeline's iterators prepared: kept, and rejected by kind (each source logged once)."""

    kept: int = 0
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejected_sources: set = dataclasses.field(default_factory=set)

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.rejected.items())) or "none"
        return (f"{self.kept} records kept, {self.total_rejected} rejected ({kinds}) from "
                f"{len(self.rejected_sources)} distinct sources")


class _Screen:
    """grain filter in the consuming process: passes prepared examples, counts and logs rejections."""

    def __init__(self, stats: PipelineStats, shard_size: int):
        self.stats, self.shard_size, self.streak = stats, shard_size, 0

    def __call__(self, element: dict[str, np.ndarray] | _Rejected) -> bool:
        if not isinstance(element, _Rejected):
            self.stats.kept += 1
            self.streak = 0
            return True
        self.stats.rejected[element.kind] += 1
        if element.source not in self.stats.rejected_sources:
            self.stats.rejected_sources.add(element.source)
            log.warning("skipping %s (%s): %s", element.source, element.kind, element.reason)
        self.streak += 1
        if self.streak >= 2 * self.shard_size:  # a good record recurs within 2n - 2 draws across an epoch change
            raise ValueError(f"every record of this host's shard ({self.shard_size}) is rejected: "
                             f"{self.stats.summary()}")
        return False


class MultimodalPipeline:
    """Fixed-shape batches of prepared records: this host's shard, reshuffled every epoch from `seed`.

    Each batch is `prepare`'s dict with a leading batch axis of `batch_size` (this host's rows). Records
    `prepare` rejects are skipped (see `stats`). `num_workers` > 0 prepares in that many grain worker
    processes; 0 prepares in this process (with `read_threads` threads reading ahead). `iterator(state)`
    resumes exactly where `get_state()` of an earlier iterator left off (same records, config, seed, shard
    and num_workers: the state's layout depends on the worker count). `stats` counts what this object's
    iterators screened since it was made; it is not part of the state. `drop_remainder=False` keeps a
    last, smaller batch (one pass for evaluation).
    """

    def __init__(self, records: Sequence[MultimodalRecord], config: PrepareConfig, batch_size: int, seed: int, *,
                 shard: tuple[int, int] | None = None, shuffle: bool = True, num_epochs: int | None = None,
                 num_workers: int = 0, read_threads: int = 2, prefetch: int = 4, drop_remainder: bool = True):
        if batch_size < 1:
            raise ValueError(f"MultimodalPipeline: batch_size must be >= 1, got {batch_size}")
        if num_workers < 0 or read_threads < 0:
            raise ValueError("MultimodalPipeline: num_workers and read_threads must be >= 0")
        index, count = shard if shard is not None else process_shard()
        if not 0 <= index < count:
            raise ValueError(f"MultimodalPipeline: shard index {index} is not in [0, {count})")
        dataset = grain.MapDataset.source(records)
        if count > 1:
            dataset = dataset[index::count]
        if len(dataset) == 0:
            raise ValueError(f"MultimodalPipeline: shard {index}/{count} of {len(records)} records is empty")
        self.config, self.batch_size, self.num_workers = config, batch_size, num_workers
        self.drop_remainder = drop_remainder
        self.shard_size = len(dataset)
        self.stats = PipelineStats()
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        if num_epochs != 1:
            dataset = dataset.repeat(num_epochs)
        self._dataset = dataset.map(functools.partial(_prepare_or_reject, config=config))
        self._read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._screen = _Screen(self.stats, self.shard_size)

    def dataset(self) -> grain.IterDataset:
        """The grain dataset of batches (prepare in workers, screen and batch here)."""
        ds = self._dataset.to_iter_dataset(self._read_options)
        if self.num_workers > 0:
            if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app their defaults hold
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=self.num_workers))
        return ds.filter(self._screen).batch(self.batch_size, drop_remainder=self.drop_remainder)

    def iterator(self, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
        """A batch iterator, positioned at `state` (an earlier iterator's get_state()) when given."""
        it = iter(self.dataset())
        if state is not None:
            it.set_state(state)
        return it


# -------------------------------------------------------------------------------------------------
# Encoder-feature cache


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _canonical(value: Any) -> bytes:
    """Stable bytes of a settings value (dataclasses, mappings, sequences, scalars)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {"__class__": type(value).__name__, **dataclasses.asdict(value)}
    return json.dumps(value, sort_keys=True, default=repr).encode()


def encoder_identity(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> str:
    """A digest naming an encoder: its resolved path, its config (config.json when not given) and the
    size and modification time of its weight files, so a changed encoder gets new cache keys."""
    path = Path(path).resolve()
    if config is None:
        config_file = path / "config.json" if path.is_dir() else path
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    weights = sorted(p for p in (path.iterdir() if path.is_dir() else [path])
                     if p.suffix in (".safetensors", ".bin", ".pth", ".npz", ".msgpack"))
    stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return _digest(str(path).encode(), _canonical(dict(config)), _canonical(stamps))


def item_digest(item: Item) -> str:
    """A digest of an item's content: a file's bytes, or an array's dtype, shape and bytes."""
    if isinstance(item, np.ndarray):
        array = np.ascontiguousarray(item)
        return _digest(str(array.dtype).encode(), str(array.shape).encode(), array.tobytes())
    h = hashlib.sha256()
    with open(item, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def params_identity(params: Any) -> str:
    """A digest of a parameter tree's content (paths, dtypes, shapes, bytes): the same weights give the same
    identity wherever they were loaded from, changed weights a new one."""
    import jax  # noqa: PLC0415 (the data layer needs jax only here)

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


class FeatureCacheMiss(RuntimeError):
    """An item `prepare` was to read from a feature cache is not there (the cache was not filled for it)."""


class FeatureCache:
    """Encoder features in a directory of .npy files, keyed by (encoder identity, preprocessing settings,
    modality, item content), so a stale entry is never read. Off unless a task makes one; only valid
    while the encoder is frozen.

    item_shape / dtype: every entry's [N, D] and dtype (absent items of a row are zeros of that shape);
    bfloat16 entries are stored as their uint16 bits (numpy has no bfloat16 .npy type)."""

    def __init__(self, directory: str | os.PathLike, encoder: str, settings: Any,
                 item_shape: tuple[int, ...] | None = None, dtype: Any = np.float32):
        self.directory = Path(directory)
        self.item_shape = None if item_shape is None else tuple(int(n) for n in item_shape)
        self.dtype = np.dtype(dtype)
        self._bits = self.dtype.name == "bfloat16"
        self._prefix = _digest(encoder.encode(), _canonical(settings), self.dtype.name.encode()).encode()

    def key(self, kind: str, item: Item) -> str:
        return _digest(self._prefix, kind.encode(), item_digest(item).encode())

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, kind: str, item: Item) -> np.ndarray | None:
        """The cached features of `item`, or None (a missing or unreadable entry is a miss)."""
        path = self.path(self.key(kind, item))
        if not path.exists():
            return None
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("feature cache: ignoring unreadable %s (%s)", path, e)
            return None
        if self.item_shape is not None and features.shape != self.item_shape:
            log.warning("feature cache: ignoring %s of shape %s (expected %s)", path, features.shape, self.item_shape)
            return None
        return features.view(self.dtype) if self._bits else features.astype(self.dtype, copy=False)

    def put(self, kind: str, item: Item, features: np.ndarray) -> Path:
        """Writes features atomically (a reader never sees a partial file)."""
        features = np.asarray(features).astype(self.dtype, copy=False)
        if self.item_shape is not None and features.shape != self.item_shape:
            raise ValueError(f"FeatureCache.put: features of shape {features.shape}, the cache holds {self.item_shape}")
        path = self.path(self.key(kind, item))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, features.view(np.uint16) if self._bits else features, allow_pickle=False)
        os.replace(tmp, path)
        return path

    def features(self, kind: str, items: Sequence[Item],
                 encode: Callable[[list[Item]], Sequence[np.ndarray]]) -> list[np.ndarray]:
        """Features of every item: cached ones read, the misses encoded in one `encode` call and stored."""
        found = [self.get(kind, item) for item in items]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            encoded = encode([items[i] for i in missing])
            if len(encoded) != len(missing):
                raise ValueError(f"FeatureCache.features: encode returned {len(encoded)} arrays for "
                                 f"{len(missing)} items")
            for i, features in zip(missing, encoded):
                self.put(kind, items[i], features)
                found[i] = np.asarray(features).astype(self.dtype, copy=False)
        return found


@dataclasses.dataclass
class FillStats:
    """What `fill_feature_cache` did: items found cached, encoded now, and skipped as bad (the pipeline
    rejects their records and reports them)."""

    cached: int = 0
    encoded: int = 0
    bad: int = 0


def fill_feature_cache(records: Sequence[MultimodalRecord], config: PrepareConfig, cache: FeatureCache,
                       encode: Callable[[str, np.ndarray, np.ndarray | None], np.ndarray], batch_size: int,
                       shard: tuple[int, int] | None = None, progress: Callable[[str], None] | None = print
                       ) -> FillStats:
    """Encodes every item of this host's shard of `records` (the shard `MultimodalPipeline` reads) that
    `cache` lacks. `encode(kind, inputs [n, ...], mask [n, ...] or None)` -> features [n, N, D] runs the
    frozen encoder; batches are padded to `batch_size` rows (one compiled shape). Bad items are skipped
    (BadRecord: the pipeline counts their records). `progress` gets a line about every tenth of the work."""
    if batch_size < 1:
        raise ValueError(f"fill_feature_cache: batch_size must be >= 1, got {batch_size}")
    index, count = shard if shard is not None else process_shard()
    mine = list(records)[index::count]
    stats = FillStats()
    pending: dict[str, list[tuple[Item, np.ndarray, np.ndarray | None]]] = {"image": [], "audio": []}
    seen: set[tuple[str, str]] = set()

    def flush(kind: str) -> None:
        batch = pending[kind]
        if not batch:
            return
        pad = batch_size - len(batch)
        inputs = np.stack([b[1] for b in batch] + [np.zeros_like(batch[0][1])] * pad)
        masks = None if batch[0][2] is None else np.stack([b[2] for b in batch] + [np.zeros_like(batch[0][2])] * pad)
        features = np.asarray(encode(kind, inputs, masks))
        for (item, _, _), f in zip(batch, features):
            cache.put(kind, item, f)
        stats.encoded += len(batch)
        pending[kind] = []

    step = max(len(mine) // 10, 1)
    for n, record in enumerate(mine, 1):
        source = record.source or "<record>"
        for kind, items in (("image", record.images), ("audio", record.audio)):
            for item in items:
                key = cache.key(kind, item) if not isinstance(item, (str, os.PathLike)) or os.path.exists(item) else None
                if key is not None and ((kind, key) in seen or cache.path(key).exists()):
                    stats.cached += (kind, key) not in seen
                    seen.add((kind, key))
                    continue
                try:
                    if kind == "image":
                        if config.image is None:
                            raise BadRecord(source, "unsupported", "holds an image; no image preprocessing is set")
                        pending[kind].append((item, _image_item(item, config.image, source), None))
                    else:
                        if config.audio is None:
                            raise BadRecord(source, "unsupported", "holds audio; no audio preprocessing is set")
                        inputs, mask, _ = _audio_item(item, config, source)
                        pending[kind].append((item, inputs, mask))
                except BadRecord:
                    stats.bad += 1
                    continue
                seen.add((kind, key))
                if len(pending[kind]) == batch_size:
                    flush(kind)
        if progress is not None and (n % step == 0 or n == len(mine)):
            progress(f"feature cache {cache.directory}: {n}/{len(mine)} records, {stats.cached} items cached "
                     f"before, {stats.encoded} encoded, {stats.bad} bad")
    for kind in pending:
        flush(kind)
    if progress is not None and stats.encoded:
        progress(f"feature cache {cache.directory}: {stats.encoded} items encoded in all")
    return stats


# -------------------------------------------------------------------------------------------------
# Synthetic task: questions about procedural images

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (225, 205, 40)}
POSITIONS = ("left", "middle", "right")
COUNTS = ("one", "two", "three")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is in the picture?",
    "position": "Is the shape on the left, in the middle or on the right?",
    "count": "How many shapes are there?",
}
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS, "count": COUNTS}


def _draw(canvas: np.ndarray, shape: str, cx: float, cy: float, radius: float, colour: np.ndarray) -> None:
    """Paints a filled shape of `radius` centred at (cx, cy) onto canvas [S, S, 3] in place."""
    size = canvas.shape[0]
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
    elif shape == "square":
        half = radius * 0.85
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # triangle, apex up: half-width grows from 0 at the top to `radius` at the base
        inside = (y >= cy - radius) & (y <= cy + radius) & (np.abs(x - cx) <= (y - (cy - radius)) / 2)
    canvas[inside] = colour


def _colour(name: str, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(COLOURS[name]) + rng.integers(-20, 21, 3), 0, 255)


def _balanced_answers(kind: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` answers of `kind`, each answer equally often (to within one): blocks of shuffled answers."""
    answers = ANSWERS[kind]
    blocks = [list(rng.permutation(len(answers))) for _ in range(-(-count // len(answers)))]
    return [answers[i] for block in blocks for i in block][:count]


def shape_scene(kind: str, answer: str, rng: np.random.Generator, size: int = 32,
                drawn: list[dict[str, Any]] | None = None) -> np.ndarray:
    """An image [size, size, 3] uint8 whose answer to QUESTIONS[kind] is `answer`; all else random.
    `drawn`, when given, receives each shape painted ({'shape', 'colour', 'x', 'y'}: its centre in pixels),
    so every attribute of the scene is known (e.g. to pretrain an encoder on them)."""
    if answer not in ANSWERS[kind]:
        raise ValueError(f"shape_scene: {answer!r} is not an answer to {kind!r} questions: {ANSWERS[kind]}")
    scale = size / 32
    background = rng.integers(0, 70) * np.ones(3) + rng.integers(-8, 9, 3)
    canvas = np.clip(background + rng.normal(0, 3, (size, size, 3)), 0, 255)
    if kind == "count":
        radius = rng.uniform(3.0, 4.0) * scale
        cell = size / 3
        for index in rng.choice(9, COUNTS.index(answer) + 1, replace=False):
            cx = (index % 3 + 0.5) * cell + rng.uniform(-0.5, 0.5) * scale
            cy = (index // 3 + 0.5) * cell + rng.uniform(-0.5, 0.5) * scale
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
            _draw(canvas, shape, cx, cy, radius, _colour(colour, rng))
            if drawn is not None:
                drawn.append({"shape": shape, "colour": colour, "x": float(cx), "y": float(cy)})
        return canvas.astype(np.uint8)
    radius = rng.uniform(3.5, 5.0) * scale
    shape = answer if kind == "shape" else str(rng.choice(SHAPES))
    colour = answer if kind == "colour" else str(rng.choice(list(COLOURS)))
    third = POSITIONS.index(answer) if kind == "position" else int(rng.integers(3))
    margin = 1.5 * scale  # the centre stays this far inside its third, so the answer is unambiguous
    low, high = max(radius, third * size / 3 + margin), min(size - radius, (third + 1) * size / 3 - margin)
    cx, cy = rng.uniform(low, high), rng.uniform(radius, size - radius)
    _draw(canvas, shape, cx, cy, radius, _colour(colour, rng))
    if drawn is not None:
        drawn.append({"shape": shape, "colour": colour, "x": float(cx), "y": float(cy)})
    return canvas.astype(np.uint8)


def shapes_records(count: int, seed: int, size: int = 32) -> list[MultimodalRecord]:
    """`count` image-question records (LLaVA turns, the image as uint8 [size, size, 3]), deterministic from
    `seed`. Kinds rotate through QUESTIONS; within a kind every answer is equally frequent, so an image-blind
    answer scores at most about 1/3 (`blind_prior_accuracy`)."""
    if count < 1 or size < 24:
        raise ValueError(f"shapes_records: count must be >= 1 and size >= 24, got {count}, {size}")
    rng = np.random.default_rng([seed, 0x5A17E5])
    kinds = list(QUESTIONS)
    per_kind = {k: _balanced_answers(k, len(range(i, count, len(kinds))), rng) for i, k in enumerate(kinds)}
    records = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        answer = per_kind[kind][index // len(kinds)]
        image = shape_scene(kind, answer, rng, size)
        conversation = [{"from": "human", "value": f"{IMAGE_MARKER}\n{QUESTIONS[kind]}"},
                        {"from": "gpt", "value": answer}]
        records.append(MultimodalRecord(conversation, [image], [], f"shapes(seed={seed})[{index}]"))
    return records


def question_and_answer(record: MultimodalRecord) -> tuple[str, str]:
    """(the first user turn without its markers, '' when there is none (the reference's ASR records), the
    first assistant answer) of a record."""
    question = next((t["value"] for t in record.conversation if t["from"].lower() in mm.USER_ROLES), "")
    answer = next(t["value"] for t in record.conversation if t["from"].lower() in mm.ASSISTANT_ROLES)
    return question.replace(IMAGE_MARKER, "").replace(AUDIO_MARKER, "").strip(), answer.strip()


def blind_prior_accuracy(records: Sequence[MultimodalRecord],
                         fit_records: Sequence[MultimodalRecord] | None = None) -> float:
    """Accuracy on `records` of the best image-blind answer: the most frequent answer per question text in
    `fit_records` (default `records` themselves, the strongest blind guess)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for record in fit_records if fit_records is not None else records:
        question, answer = question_and_answer(record)
        counts[question][answer] += 1
    best = {q: c.most_common(1)[0][0] for q, c in counts.items()}
    pairs = [question_and_answer(r) for r in records]
    return sum(best.get(q) == a for q, a in pairs) / max(len(pairs), 1)


# -------------------------------------------------------------------------------------------------
# Synthetic task: transcribing DTMF digit tones

DTMF = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209), "5": (770, 1336),
        "6": (770, 1477), "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "0": (941, 1336)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_words(digits: str) -> str:
    """'407' -> 'four zero seven'."""
    return " ".join(DIGIT_WORDS[int(d)] for d in digits)


def dtmf_signal(digits: str, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """16 kHz float32 samples of `digits` as DTMF tone pairs (random tone and gap lengths, amplitude,
    phases, lead-in and noise) and each tone's (start, end) sample span."""
    if not digits or any(d not in DTMF for d in digits):
        raise ValueError(f"dtmf_signal: digits must be a non-empty string of 0-9, got {digits!r}")

    def ms(low: float, high: float) -> int:
        return int(rng.uniform(low, high) * SAMPLING_RATE / 1000)

    pieces, spans, at = [np.zeros(ms(30, 200))], [], 0
    at = pieces[0].size
    fade = int(0.005 * SAMPLING_RATE)
    for digit in digits:
        length = ms(60, 160)
        t = np.arange(length) / SAMPLING_RATE
        low, high = DTMF[digit]
        tone = 0.5 * (np.sin(2 * np.pi * low * t + rng.uniform(0, 2 * np.pi))
                      + np.sin(2 * np.pi * high * t + rng.uniform(0, 2 * np.pi)))
        envelope = np.ones(length)
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
        envelope[:fade], envelope[-fade:] = ramp, ramp[::-1]
        pieces += [rng.uniform(0.15, 0.6) * tone * envelope, np.zeros(ms(40, 150))]
        spans.append((at, at + length))
        at += length + pieces[-1].size
    signal = np.concatenate(pieces + [np.zeros(ms(30, 200))])
    signal = signal + rng.normal(0, rng.uniform(0.002, 0.03), signal.size)
    return signal.astype(np.float32), spans


def dtmf_records(count: int, seed: int, min_digits: int = 3, max_digits: int = 6,
                 instruction: str | None = ASR_INSTRUCTION) -> list[MultimodalRecord]:
    """`count` transcription records (audio as float32 arrays, transcripts as digit words), from `seed`."""
    if count < 1 or not 1 <= min_digits <= max_digits:
        raise ValueError(f"dtmf_records: need count >= 1 and 1 <= min_digits <= max_digits, got {count}, "
                         f"{min_digits}, {max_digits}")
    rng = np.random.default_rng([seed, 0xD7])
    records = []
    for index in range(count):
        digits = "".join(str(d) for d in rng.integers(0, 10, rng.integers(min_digits, max_digits + 1)))
        samples, _ = dtmf_signal(digits, rng)
        records.append(MultimodalRecord(asr_conversation(digit_words(digits), instruction), [], [samples],
                                        f"dtmf(seed={seed})[{index}]"))
    return records


def write_dtmf_manifest(directory: str | os.PathLike, count: int, seed: int, **kwargs: Any) -> Path:
    """Writes `dtmf_records(count, seed, ...)` as 16-bit WAV files and a manifest.jsonl of {"audio", "text"}
    (for `read_audio_manifest`); returns the manifest's path."""
    directory = Path(directory)
    (directory / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, record in enumerate(dtmf_records(count, seed, **kwargs)):
        name = f"clips/dtmf_{index:05d}.wav"
        pcm = np.clip(np.round(record.audio[0] * 32768), -32768, 32767).astype("<i2")  # read back as pcm / 32768
        with wave.open(os.fspath(directory / name), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(SAMPLING_RATE)
            f.writeframes(pcm.tobytes())
        lines.append(json.dumps({"audio": name, "text": record.conversation[-1]["value"]}))
    manifest = directory / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# DTMF frame labels: what a Whisper-style encoder is pretrained to hear (launch/make_tiny_asr.py)

SILENCE = 10  # class of a position with no tone; digits are their own classes 0-9
DTMF_CLASSES = 11
FRAME_SAMPLES = 2 * audio_lib.WHISPER_HOP  # samples per Whisper encoder position (20 ms)


def dtmf_frame_labels(digits: str, spans: Sequence[tuple[int, int]], samples: int, positions: int,
                      chunk_seconds: int, edge: float = 0.6) -> np.ndarray:
    """Labels [positions] int32 of one clip of `samples` samples whose tones (`dtmf_signal`'s spans) spell
    `digits`. Encoder position j covers the 20 ms around sample 320 j (its mel frames are centred there): the
    digit whose tone covers at least `edge` of it, SILENCE when tones cover at most 1 - `edge`, else -1 (no
    label). Positions past what ModRWKV keeps (mask.sum() // 2 + 1) get -1."""
    if len(digits) != len(spans):
        raise ValueError(f"dtmf_frame_labels: {len(digits)} digits but {len(spans)} spans")
    centres = np.arange(positions) * FRAME_SAMPLES
    low, high = centres - FRAME_SAMPLES // 2, centres + FRAME_SAMPLES // 2
    cover = np.zeros((positions, len(spans)))
    for i, (start, end) in enumerate(spans):
        cover[:, i] = np.clip(np.minimum(high, end) - np.maximum(low, start), 0, None) / FRAME_SAMPLES
    labels = np.full(positions, -1, np.int32)
    labels[cover.sum(axis=1) <= 1 - edge] = SILENCE
    if spans:
        best = np.argmax(cover, axis=1)
        tone = cover[np.arange(positions), best] >= edge
        labels[tone] = np.asarray([int(d) for d in digits], np.int32)[best[tone]]
    labels[whisper_frames(samples, chunk_seconds):] = -1
    return labels


def dtmf_rows(rng: np.random.Generator, count: int, chunk_seconds: int, n_mels: int = 80, min_digits: int = 1,
              max_digits: int = 8) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """`count` DTMF clips of min_digits-max_digits random digits as Whisper encoder inputs
    {'input_features' [count, n_mels, 100 * chunk_seconds] (log-mel), 'attention_mask' [count, frames]}, their
    per-position labels [count, 50 * chunk_seconds] (`dtmf_frame_labels`, -1: none) and digit strings."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"dtmf_rows: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    positions = audio_lib.whisper_mel_frames(chunk_seconds) // 2
    waves, labels, strings = [], [], []
    for _ in range(count):
        digits = "".join(str(d) for d in rng.integers(0, 10, rng.integers(min_digits, max_digits + 1)))
        wave, spans = dtmf_signal(digits, rng)
        if wave.size > chunk_seconds * SAMPLING_RATE:
            raise ValueError(f"dtmf_rows: a {len(digits)}-digit clip lasts {wave.size / SAMPLING_RATE:.2f} s, "
                             f"longer than the {chunk_seconds} s window; lower max_digits")
        waves.append(wave)
        labels.append(dtmf_frame_labels(digits, spans, wave.size, positions, chunk_seconds))
        strings.append(digits)
    features, mask = audio_lib.whisper_features(waves, n_mels, chunk_seconds=chunk_seconds)
    return {"input_features": features, "attention_mask": mask}, np.stack(labels), strings


def collapse_frames(predictions: np.ndarray, length: int) -> str:
    """The digit string of per-position predictions [positions] (classes 0-9 and SILENCE) over the first
    `length` positions: runs of one digit, split by silence or by a change of digit, give one digit each."""
    out, previous = [], SILENCE
    for label in np.asarray(predictions)[:length]:
        if label != SILENCE and label != previous:
            out.append(str(int(label)))
        previous = label
    return "".join(out)
