"""Audio front ends in numpy: Whisper's log-mel features, WavLM's input values, and file decoding.

`whisper_features` reproduces `transformers.WhisperFeatureExtractor` (padding to its `chunk_length`, 30 s
by default; 25 ms Hann window, 10 ms hop, Slaney mel filters, log10 with an 8-decade floor) so a
checkpoint sees the inputs it was trained on without importing transformers at run time.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

try:
    import soundfile  # optional (extra 'multimodal'): only reading real audio files needs it
except ImportError:
    soundfile = None

WHISPER_N_FFT = 400
WHISPER_HOP = 160
WHISPER_CHUNK_SECONDS = 30  # WhisperFeatureExtractor's default chunk_length
WHISPER_SAMPLING_RATE = 16000


def _hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mels)


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    """Inverse of `_hertz_to_mel`."""
    mels = np.asarray(mels, np.float64)
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    return np.where(log_region, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filters(n_mels: int, n_fft: int = WHISPER_N_FFT, sampling_rate: int = 16000,
                max_frequency: float = 8000.0) -> np.ndarray:
    """Slaney-normalised triangular mel filters [n_fft // 2 + 1, n_mels] (librosa / Whisper's bank)."""
    n_bins = 1 + n_fft // 2
    filter_hz = _mel_to_hertz(np.linspace(_hertz_to_mel(0.0), _hertz_to_mel(max_frequency), n_mels + 2))
    fft_hz = np.linspace(0, sampling_rate // 2, n_bins)
    slopes = filter_hz[None, :] - fft_hz[:, None]  # [n_bins, n_mels + 2]
    widths = np.diff(filter_hz)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (filter_hz[2:n_mels + 2] - filter_hz[:n_mels]))[None, :]


def _pad_batch(waves: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads (or truncates) mono clips to `length` samples: (samples [B, length], valid counts [B])."""
    batch = np.zeros((len(waves), length), np.float64)
    counts = np.zeros((len(waves),), np.int64)
    for row, wave in enumerate(waves):
        wave = np.asarray(wave, np.float32).reshape(-1)[:length]
        batch[row, :wave.shape[0]] = wave
        counts[row] = wave.shape[0]
    return batch, counts


def _as_list(waves: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """One clip or a batch of clips as a list of 1-D arrays."""
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        return [waves]
    if isinstance(waves, np.ndarray) and waves.ndim != 2:
        raise ValueError(f"audio: expected mono clips [samples] or [batch, samples], got shape {waves.shape}")
    return [np.asarray(w) for w in waves]


def whisper_mel_frames(chunk_seconds: int = WHISPER_CHUNK_SECONDS) -> int:
    """Log-mel frames of a Whisper window of `chunk_seconds` (nb_max_frames: 3000 for 30 s); the encoder
    takes them as [n_mels, frames] and gives half as many positions (max_source_positions)."""
    if isinstance(chunk_seconds, bool) or not isinstance(chunk_seconds, (int, np.integer)) or chunk_seconds < 1:
        raise ValueError(f"Whisper chunk_length must be a whole number of seconds >= 1, got {chunk_seconds!r}")
    return int(chunk_seconds) * WHISPER_SAMPLING_RATE // WHISPER_HOP


def whisper_chunk_seconds(preprocessor: dict | None, max_source_positions: int | None = None,
                          source: str = "preprocessor_config.json") -> int:
    """The window length (s) of a Whisper checkpoint: its preprocessor's chunk_length (30 when absent),
    checked against the encoder's max_source_positions (= chunk_length * 50) when given."""
    chunk = (preprocessor or {}).get("chunk_length", WHISPER_CHUNK_SECONDS)
    try:
        frames = whisper_mel_frames(chunk)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if max_source_positions is not None and frames != 2 * max_source_positions:
        raise ValueError(f"{source}: chunk_length {chunk} s gives {frames} mel frames, but the encoder's "
                         f"max_source_positions {max_source_positions} takes {2 * max_source_positions}")
    return int(chunk)


def whisper_preprocessor_config(n_mels: int = 80, chunk_seconds: int = WHISPER_CHUNK_SECONDS) -> dict:
    """The preprocessor_config.json of a Whisper checkpoint whose features `whisper_features(waves, n_mels,
    chunk_seconds=chunk_seconds)` gives: WhisperFeatureExtractor's saved fields."""
    frames = whisper_mel_frames(chunk_seconds)
    return {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": int(n_mels),
            "sampling_rate": WHISPER_SAMPLING_RATE, "hop_length": WHISPER_HOP, "n_fft": WHISPER_N_FFT,
            "chunk_length": int(chunk_seconds), "n_samples": frames * WHISPER_HOP, "nb_max_frames": frames,
            "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "dither": 0.0}


def whisper_features(waves: np.ndarray | Sequence[np.ndarray], n_mels: int = 80, sampling_rate: int = 16000,
                     chunk_seconds: int = WHISPER_CHUNK_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """Whisper log-mel input: (input_features [B, n_mels, F] float32, attention_mask [B, F] int32), with
    F = chunk_seconds * 100 (3000 for Whisper's 30 s; WhisperFeatureExtractor(chunk_length=chunk_seconds)).

    Each clip is padded with silence (or cut) to the chunk; the mask marks the frames that start inside the clip.
    """
    if sampling_rate != WHISPER_SAMPLING_RATE:
        raise ValueError(f"whisper_features: Whisper expects 16000 Hz audio, got sampling_rate={sampling_rate}")
    n_frames = whisper_mel_frames(chunk_seconds)
    n_samples = n_frames * WHISPER_HOP
    batch, counts = _pad_batch(_as_list(waves), n_samples)
    half = WHISPER_N_FFT // 2
    padded = np.pad(batch, ((0, 0), (half, half)), mode="reflect")  # centred frames, as torch.stft does
    starts = np.arange(n_frames) * WHISPER_HOP
    frames = padded[:, starts[:, None] + np.arange(WHISPER_N_FFT)[None, :]]  # [B, frames, n_fft]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WHISPER_N_FFT) / WHISPER_N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [B, frames, n_fft // 2 + 1]
    mel = power @ mel_filters(n_mels, WHISPER_N_FFT, sampling_rate)  # [B, frames, n_mels]
    log_mel = np.log10(np.maximum(mel, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max(axis=(1, 2), keepdims=True) - 8.0)
    features = ((log_mel + 4.0) / 4.0).transpose(0, 2, 1).astype(np.float32)  # [B, n_mels, frames]
    valid_frames = -(-counts // WHISPER_HOP)
    mask = (np.arange(n_frames)[None, :] < valid_frames[:, None]).astype(np.int32)
    return features, mask


def wavlm_inputs(waves: np.ndarray | Sequence[np.ndarray], do_normalize: bool = True,
                 sampling_rate: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    """WavLM input: (input_values [B, T] float32, attention_mask [B, T] int32), padded to the longest clip.

    With `do_normalize` (the `do_normalize` field of the checkpoint's preprocessor_config.json) each clip
    is scaled to zero mean and unit variance over its own samples, as Wav2Vec2FeatureExtractor does.
    """
    if sampling_rate != 16000:
        raise ValueError(f"wavlm_inputs: WavLM expects 16000 Hz audio, got sampling_rate={sampling_rate}")
    clips = [np.asarray(w, np.float32).reshape(-1) for w in _as_list(waves)]
    length = max(c.shape[0] for c in clips)
    values = np.zeros((len(clips), length), np.float32)
    mask = np.zeros((len(clips), length), np.int32)
    for row, clip in enumerate(clips):
        if do_normalize:
            clip = (clip - clip.mean()) / np.sqrt(clip.var() + 1e-7)
        values[row, :clip.shape[0]] = clip
        mask[row, :clip.shape[0]] = 1
    return values, mask


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decodes an audio file (WAV, FLAC, OGG, ...) to (mono float32 samples [T], sampling rate)."""
    if soundfile is None:
        raise ImportError('read_audio needs the soundfile package: pip install -e ".[multimodal]"')
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [T, channels]
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise ValueError(f"{path}: cannot decode audio ({e})") from e
    return samples.mean(axis=1).astype(np.float32), int(rate)
