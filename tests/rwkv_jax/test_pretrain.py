"""rwkv_jax.pretrain: attribute heads' sums against numpy, the batch source, and a tiny SigLIP tower that
learns to read two attributes through the training core."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.train import loop
from rwkv_jax import pretrain
from rwkv_jax.encoders import vit


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("layout", ["pooled", "tokens_row_labels", "tokens_position_labels"])
def test_head_sums_match_numpy(layout):
    rng = np.random.default_rng(0)
    b, n, k = 5, 4, 3
    valid = np.arange(n)[None] < np.array([4, 2, 1, 3, 4])[:, None]  # [B, N]
    if layout == "pooled":
        logits, labels = rng.normal(size=(b, k)), np.array([1, 0, 3, 2, 0])  # shifted: 0 = none
    elif layout == "tokens_row_labels":
        logits, labels = rng.normal(size=(b, n, k)), np.array([1, 0, 3, 2, 2])
    else:
        logits, labels = rng.normal(size=(b, n, k)), rng.integers(0, k + 1, (b, n))
    nll, correct, count = map(float, pretrain.head_sums(jnp.asarray(logits), jnp.asarray(labels),
                                                        jnp.asarray(valid)))
    logp = _log_softmax(logits)
    want_nll = want_correct = want_count = 0.0
    for i in range(b):
        if layout == "tokens_position_labels":
            for t in range(n):
                if labels[i, t]:
                    want_nll -= logp[i, t, labels[i, t] - 1]
                    want_correct += logp[i, t].argmax() == labels[i, t] - 1
                    want_count += 1
        elif labels[i]:
            target = labels[i] - 1
            if layout == "pooled":
                want_nll -= logp[i, target]
                want_correct += logp[i].argmax() == target
            else:  # the mean over the row's valid positions
                positions = np.flatnonzero(valid[i])
                want_nll -= logp[i, positions, target].mean()
                want_correct += (logp[i, positions].argmax(-1) == target).mean()
            want_count += 1
    assert count == want_count
    np.testing.assert_allclose([nll, correct], [want_nll, want_correct], rtol=1e-5)


class _Frames(nn.Module):
    """An audio-like encoder: inputs [B, N, 2] -> (features [B, N, 2] unchanged, lengths [B])."""

    peft: object = None

    def __call__(self, x, lengths):
        return x, lengths


def test_mean_pooling_reads_only_valid_positions():
    x = np.random.default_rng(1).normal(size=(2, 5, 2)).astype(np.float32)
    lengths = np.array([5, 2])
    model = pretrain.AttributeModel(_Frames(), (("a", 3),), ("x", "n"), pooling="mean")
    params = model.init(jax.random.key(0), {"x": x, "n": lengths})["params"]
    logits, valid = model.apply({"params": params}, {"x": x, "n": lengths})
    head = nn.unbox(params)["heads"]["a"]
    pooled = np.stack([x[0].mean(0), x[1, :2].mean(0)])
    np.testing.assert_allclose(np.asarray(logits["a"]), pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid), np.arange(5)[None] < lengths[:, None])


# -------------------------------------------------------------------------------------------- the task

CFG = vit.VisionConfig(arch="siglip", hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=8,
                       patch_size=4)


def _quadrants(count: int, seed: int) -> pretrain.AttributeData:
    """8x8 images with one bright quadrant in one channel: labels 'where' (quadrant, 4 classes) and
    'channel' (3 classes, left out on every third image)."""
    rng = np.random.default_rng(seed)
    where, channel = rng.integers(0, 4, count), rng.integers(0, 3, count)
    pixels = rng.normal(0, 0.1, (count, 3, 8, 8)).astype(np.float32) - 1
    for i in range(count):
        r, c = divmod(int(where[i]), 2)
        pixels[i, channel[i], 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 2
    labels = {"where": where.astype(np.int32),
              "channel": np.where(np.arange(count) % 3 == 0, -1, channel).astype(np.int32)}
    return pretrain.AttributeData({"pixel_values": pixels}, labels)


def _task(steps: int = 60, pooling: str = "tokens", train: pretrain.AttributeData | None = None
          ) -> pretrain.AttributeTask:
    c = pretrain.config(steps=steps, checkpoint_every=steps, log_every=steps)
    c.pretrain.update(batch_size=16, micro_batch_size=8, pooling=pooling)
    c.optim.update(learning_rate=1e-2, warmup_steps=5)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    params = pretrain.scratch_init(vit.init_params(CFG, jax.random.key(0)), jax.random.key(1))
    return pretrain.AttributeTask(c, vit.VisionEncoder(CFG), params, {"where": 4, "channel": 3}, ("pixel_values",),
                                  train if train is not None else _quadrants(256, 0), _quadrants(128, 1))


@pytest.mark.parametrize("pooling", ["tokens", pytest.param("mean", marks=pytest.mark.slow)])
def test_an_encoder_learns_to_read_the_attributes_through_the_core(pooling, tmp_path):
    task = _task(steps=200, pooling=pooling)
    run = loop.train(task, task.c, tmp_path, mesh=mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    assert run.results["heldout_accuracy_before"] < 0.6
    accuracies = task.accuracies(run.frozen, run.state.adapter)
    assert set(accuracies) == {"where", "channel"} and min(accuracies.values()) > 0.9, accuracies
    encoder = pretrain.trained_encoder(run)  # the trained copies, in the tower's own tree
    pixels = _quadrants(4, 2).inputs["pixel_values"]
    features = vit.VisionEncoder(CFG).apply({"params": encoder}, pixels)
    variables = run.method.model_variables(run.frozen["base"], run.state.adapter)
    np.testing.assert_allclose(np.asarray(features), np.asarray(task.module.apply(
        variables, pixels, method=lambda m, x: m.encoder(x))), rtol=1e-6, atol=1e-6)


def test_padding_rows_and_unlabelled_items_weigh_nothing():
    task = _task()
    run = loop.build(task, task.c, mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
    rows, totals, _ = task.next_batch(1, None, None)
    assert totals["labels"] == 16 + int((rows["label/channel"] > 0).sum()) < 32  # every third: no channel
    padded = {k: np.concatenate([v, np.zeros_like(v[:5])]) for k, v in rows.items()}  # the loop's padding rows
    t = {"labels": jnp.float32(totals["labels"])}
    loss, sums = task.loss(run.frozen, run.state.adapter, rows, t)
    loss_padded, sums_padded = task.loss(run.frozen, run.state.adapter, padded, t)
    np.testing.assert_allclose(float(loss), float(loss_padded), rtol=1e-6)
    assert float(sums["weight"]) == float(sums_padded["weight"]) == totals["labels"]
    assert 0.5 < float(loss) / len(task.heads) < 2.0  # about log(classes) per head at the init


def test_batches_are_seeded_and_resume_from_their_position():
    data = _quadrants(40, 3)
    straight = _task(train=data)
    batches = [straight.next_batch(step, None, None)[0] for step in range(1, 5)]  # crosses an epoch (40 rows)
    first = _task(train=data)
    first.next_batch(1, None, None)
    resumed = _task(train=data)
    resumed.restore_data_state(first.data_state())
    for step, want in zip(range(2, 5), batches[1:]):
        got = resumed.next_batch(step, None, None)[0]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    seen = np.concatenate([b["label/where"] for b in batches[:3]])[:40]  # the first epoch: a permutation
    assert sorted(seen.tolist()) == sorted((data.labels["where"] + 1).tolist())


def test_scratch_init_scales_kernels_by_fan_in():
    params = pretrain.scratch_init(vit.init_params(CFG.replace(hidden_size=64, intermediate_size=256),
                                                   jax.random.key(0)), jax.random.key(1))
    assert abs(np.std(params["layers_0"]["mlp"]["fc2"]["kernel"]) * np.sqrt(256) - 1) < 0.05
    assert abs(np.std(params["embeddings"]["position_embedding"]) * np.sqrt(64) - 1) < 0.1
    np.testing.assert_array_equal(params["post_layernorm"]["scale"], np.ones(64, np.float32))
    np.testing.assert_array_equal(params["layers_0"]["mlp"]["fc2"]["bias"], np.zeros(64, np.float32))


def test_bad_data_is_refused():
    good = _quadrants(8, 0)
    with pytest.raises(ValueError, match="same number of examples"):
        pretrain.AttributeData(good.inputs, {"where": good.labels["where"][:4]})
    with pytest.raises(ValueError, match="reach 3, the head has 3 classes"):
        bad = pretrain.AttributeData(good.inputs, {"where": good.labels["where"],
                                                   "channel": np.full(8, 3, np.int32)})
        _task(train=bad)
    per_position = pretrain.AttributeData(good.inputs, {"where": np.zeros((8, 4), np.int32),
                                                        "channel": good.labels["channel"]})
    with pytest.raises(loop.ConfigError, match="per-position labels"):
        _task(pooling="mean", train=per_position)
