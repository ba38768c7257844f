"""rwkv_jax.data's DTMF frame labels, what the tiny ASR encoder is pretrained to hear: hand-computed, and
read back into the digits by construction."""

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax.encoders import audio

S = data.SILENCE


def test_dtmf_frame_labels_hand_computed():
    # Position j covers samples [320 j - 160, 320 j + 160). Tone '7' on [1280, 3000): position 4 is half
    # covered (no label), 5-8 fully, 9 for 280/320; tone '3' on [5000, 5400): position 16 for 280/320,
    # 17 for 120/320 (silence). 6000 samples: 38 mel frames, ModRWKV keeps 38 // 2 + 1 = 20 positions.
    labels = data.dtmf_frame_labels("73", [(1280, 3000), (5000, 5400)], 6000, 30, chunk_seconds=4)
    want = [S] * 4 + [-1] + [7] * 5 + [S] * 6 + [3] + [S] * 3 + [-1] * 10
    np.testing.assert_array_equal(labels, want)
    assert labels.dtype == np.int32
    with pytest.raises(ValueError, match="2 digits but 1 spans"):
        data.dtmf_frame_labels("73", [(0, 10)], 100, 5, chunk_seconds=1)


def test_collapse_frames():
    assert data.collapse_frames(np.array([S, 3, 3, S, 3, 5, 5, S, 9]), 8) == "335"
    assert data.collapse_frames(np.array([S, S]), 2) == ""
    assert data.collapse_frames(np.array([0, 0, S, 0]), 4) == "00"


def test_dtmf_rows_labels_spell_the_digits():
    rng = np.random.default_rng(7)
    inputs, labels, digits = data.dtmf_rows(rng, 12, chunk_seconds=2, n_mels=80, min_digits=1, max_digits=4)
    assert inputs["input_features"].shape == (12, 80, 200) and inputs["attention_mask"].shape == (12, 200)
    assert labels.shape == (12, 100) and labels.dtype == np.int32 and labels.min() >= -1
    kept = inputs["attention_mask"].sum(1) // 2 + 1
    for row, n, d in zip(labels, kept, digits):
        assert (row[n:] == -1).all() and (row[:n] >= 0).mean() > 0.7
        # A tone lasts >= 60 ms and a gap >= 40 ms, so every tone labels a position and every gap holds a
        # silent one: the labels read back the digits, repeated ones included (unlabelled edges as silence).
        assert data.collapse_frames(np.where(row < 0, S, row), int(n)) == d
    # The features are the Whisper front end's for a 2 s window, of the clips the same draws make.
    rng = np.random.default_rng(7)
    waves = []
    for _ in range(12):
        count = rng.integers(1, 5)
        waves.append(data.dtmf_signal("".join(str(x) for x in rng.integers(0, 10, count)), rng)[0])
    features, mask = audio.whisper_features(waves, 80, chunk_seconds=2)
    np.testing.assert_array_equal(inputs["input_features"], features)
    np.testing.assert_array_equal(inputs["attention_mask"], mask)
    with pytest.raises(ValueError, match="longer than the 1 s window"):
        data.dtmf_rows(np.random.default_rng(0), 4, chunk_seconds=1, min_digits=8, max_digits=8)
