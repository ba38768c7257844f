"""Encoder pretraining on the training core, and the DTMF frame labels (hand-computed and by construction)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.train import loop
from rwkv_jax import data
from rwkv_jax import pretrain_audio as pa
from rwkv_jax.encoders import whisper

S = pa.SILENCE


def test_dtmf_frame_labels_hand_computed():
    # Position j covers samples [320 j - 160, 320 j + 160). Tone '7' on [1280, 3000): position 4 is half
    # covered (no label), 5-8 fully, 9 for 280/320; tone '3' on [5000, 5400): position 16 for 280/320,
    # 17 for 120/320 (silence). 6000 samples: 38 mel frames, ModRWKV keeps 38 // 2 + 1 = 20 positions.
    labels, weights = pa.dtmf_frame_labels("73", [(1280, 3000), (5000, 5400)], 6000, 30, chunk_seconds=4)
    want = [S] * 4 + [S] + [7] * 5 + [S] * 6 + [3] + [S] * 3
    np.testing.assert_array_equal(labels[:20], want)
    np.testing.assert_array_equal(weights, [1] * 4 + [0] + [1] * 15 + [0] * 10)
    assert labels.dtype == np.int32 and weights.dtype == np.float32
    with pytest.raises(ValueError, match="2 digits but 1 spans"):
        pa.dtmf_frame_labels("73", [(0, 10)], 100, 5, chunk_seconds=1)


def test_collapse_frames():
    assert pa.collapse_frames(np.array([S, 3, 3, S, 3, 5, 5, S, 9]), 8) == "335"
    assert pa.collapse_frames(np.array([S, S]), 2) == ""
    assert pa.collapse_frames(np.array([0, 0, S, 0]), 4) == "00"


def test_dtmf_rows_labels_spell_the_digits():
    rng = np.random.default_rng(7)
    rows, digits = pa.dtmf_rows(rng, 12, chunk_seconds=2, n_mels=80, min_digits=1, max_digits=4)
    assert rows["inputs"].shape == (12, 80, 200) and rows["attention_mask"].shape == (12, 200)
    assert rows["label_frames"].shape == rows["weight_frames"].shape == (12, 100)
    kept = rows["attention_mask"].sum(1) // 2 + 1
    for labels, weights, n, d in zip(rows["label_frames"], rows["weight_frames"], kept, digits):
        assert not weights[n:].any() and weights[:n].mean() > 0.7
        # A tone lasts >= 60 ms and a gap >= 40 ms, so every tone labels a position and every gap holds a
        # silent one: the labels read back the digits, repeated ones included.
        assert pa.collapse_frames(labels, int(n)) == d
    # The features are the Whisper front end's for a 2 s window, of the clips the same draws make.
    rng = np.random.default_rng(7)
    waves = []
    for _ in range(12):
        count = rng.integers(1, 5)
        waves.append(data.dtmf_signal("".join(str(x) for x in rng.integers(0, 10, count)), rng)[0])
    from rwkv_jax.encoders import audio
    features, mask = audio.whisper_features(waves, 80, chunk_seconds=2)
    np.testing.assert_array_equal(rows["inputs"], features)
    np.testing.assert_array_equal(rows["attention_mask"], mask)
    with pytest.raises(ValueError, match="longer than the 1 s window"):
        pa.dtmf_rows(np.random.default_rng(0), 4, chunk_seconds=1, min_digits=8, max_digits=8)


def _tiny(heads=(pa.Head("frames", pa.DTMF_CLASSES),)):
    """A 1-layer, d_model 16 Whisper-style encoder with a 2 s window, and its initial params."""
    cfg = whisper.WhisperEncoderConfig(num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                       encoder_ffn_dim=32, max_source_positions=100)
    module = pa.EncoderWithHeads(whisper.WhisperEncoder(cfg), heads)
    example = [jnp.zeros((1, 80, 200)), jnp.zeros((1, 200), jnp.int32)]
    return cfg, module, pa.init_params(module, pa.init_whisper(cfg, 0), example, 0)


def _rows(seed, count, pooled=False):
    """DTMF rows of 2-4 digits; with `pooled`, an item-level head too: the clip's first digit."""
    rows, digits = pa.dtmf_rows(np.random.default_rng(seed), count, chunk_seconds=2, min_digits=2, max_digits=4)
    if pooled:
        rows["label_digit"] = np.asarray([int(d[0]) for d in digits], np.int32)
        rows["weight_digit"] = np.ones(count, np.float32)
    return rows


def test_loss_is_the_weighted_cross_entropy_and_ignores_zero_rows():
    heads = (pa.Head("frames", pa.DTMF_CLASSES), pa.Head("digit", 10, pooled=True))
    cfg, module, params = _tiny(heads=heads)
    c = pa.config(steps=1)
    c.pretrain.update(batch_size=4, micro_batch_size=4)
    task = pa.EncoderPretrainTask(c, module, params, lambda step: _rows(step, 4, True), _rows(99, 4, True),
                                  ("inputs", "attention_mask"))
    run = loop.build(task, c, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    rows, totals, _ = task.next_batch(1, run.frozen, run.state.adapter)
    assert totals["labels"] == rows["weight_frames"].sum() + 4
    loss, sums = task.loss(run.frozen, run.state.adapter, rows, {"labels": jnp.float32(totals["labels"])})

    logits = module.apply({"params": params}, rows["inputs"], rows["attention_mask"])
    want = correct = 0.0
    for name in ("frames", "digit"):
        z = np.asarray(logits[name], np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, rows[f"label_{name}"][..., None], -1)[..., 0]
        want -= (picked * rows[f"weight_{name}"]).sum()
        correct += ((z.argmax(-1) == rows[f"label_{name}"]) * rows[f"weight_{name}"]).sum()
    np.testing.assert_allclose(float(loss), want / totals["labels"], rtol=1e-5)
    assert float(sums["weight"]) == totals["labels"] and float(sums["accuracy"]) == correct

    padded = {k: np.concatenate([v, np.zeros_like(v[:3])]) for k, v in rows.items()}
    loss_padded, sums_padded = task.loss(run.frozen, run.state.adapter, padded,
                                         {"labels": jnp.float32(totals["labels"])})
    np.testing.assert_allclose(float(loss_padded), float(loss), rtol=1e-6)
    assert float(sums_padded["weight"]) == float(sums["weight"])


@pytest.mark.slow  # a learning run; the loss and the 8-device update are checked in CI
def test_pretraining_learns_through_the_core(tmp_path):
    cfg, module, params = _tiny()
    c = pa.config(steps=60, eval_every=0, checkpoint_every=60, log_every=100)
    c.pretrain.update(batch_size=16, micro_batch_size=8)  # two micro-batches per step
    c.optim.update(learning_rate=1e-2, warmup_steps=4)
    heldout = _rows(12345, 32)
    weights = heldout["weight_frames"]
    silence = ((heldout["label_frames"] == pa.SILENCE) * weights).sum() / weights.sum()  # ~0.6: the prior
    task = pa.EncoderPretrainTask(c, module, params, lambda step: _rows(step, 16), heldout,
                                  ("inputs", "attention_mask"))
    run = loop.train(task, c, tmp_path / "run", mesh=mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    before, after = run.results["heldout_accuracy_before"], run.results["heldout_accuracy_after"]
    assert after > 0.8 and after > silence + 0.15 and before < 0.5, (run.results, silence)
    trained = task.trained_params(run.frozen, run.state.adapter)
    assert set(trained) == {"encoder", "head_frames"}
    assert np.abs(trained["encoder"]["conv1"]["kernel"] - params["encoder"]["conv1"]["kernel"]).max() > 1e-3
    # the merged tree is what the core trained: its held-out accuracy is the run's
    logits = module.apply({"params": trained}, heldout["inputs"], heldout["attention_mask"])["frames"]
    w = heldout["weight_frames"]
    np.testing.assert_allclose(((np.argmax(logits, -1) == heldout["label_frames"]) * w).sum() / w.sum(), after,
                               rtol=1e-6)


def test_task_rejects_bad_rows():
    cfg, module, params = _tiny()
    c = pa.config()
    rows = _rows(0, 2)
    del rows["weight_frames"]
    with pytest.raises(ValueError, match=r"held-out rows: rows lack \['weight_frames'\]"):
        pa.EncoderPretrainTask(c, module, params, lambda step: rows, rows, ("inputs", "attention_mask"))


def test_sinusoids_match_transformers():
    torch_sinusoids = pytest.importorskip("transformers.models.whisper.modeling_whisper").sinusoids
    np.testing.assert_allclose(whisper.sinusoids(200, 64), torch_sinusoids(200, 64).numpy(), atol=1e-5)


def test_updates_on_8_devices_equal_one_device():
    cfg, module, params = _tiny(heads=(pa.Head("frames", pa.DTMF_CLASSES), pa.Head("digit", 10, pooled=True)))
    c = pa.config(steps=2)
    c.pretrain.update(batch_size=8, micro_batch_size=4)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        task = pa.EncoderPretrainTask(c, module, params, lambda step: _rows(step, 8, True), _rows(99, 8, True),
                                      ("inputs", "attention_mask"))
        run = loop.build(task, c, mesh_lib.make_mesh(1, -1, 1, devices))
        metrics = [run.update(*task.next_batch(step, run.frozen, run.state.adapter)[:2]) for step in (1, 2)]
        results.append((metrics, task.evaluate(run.frozen, run.state.adapter),
                        jax.device_get(run.state.adapter["encoder"]["layers_0"]["fc1"]["kernel"])))
    assert len(jax.devices()) == 8
    (m1, e1, k1), (m8, e8, k8) = results
    for a, b in zip(m1, m8):
        np.testing.assert_allclose([a["loss"], a["accuracy"]], [b["loss"], b["accuracy"]], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(e1, e8, rtol=1e-6)
    np.testing.assert_allclose(k1, k8, rtol=1e-4, atol=1e-6)
