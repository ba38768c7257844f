"""Pretraining an encoder to stand for a pretrained one: classification heads on its features, trained as a
task on the one training core (`jaxrl_peft.train.loop`), and the DTMF frame labels of the tiny ASR default.

`EncoderWithHeads` puts linear heads on any encoder whose output is features [B, N, D] (or the audio
encoders' (features, valid lengths)): a per-position head labels every output position (which digit is
sounding in each 20 ms Whisper frame), a pooled head labels the whole item (an image's shape or colour).
`EncoderPretrainTask` trains it (by default with the 'full' method: every weight) on rows that a
`sample(step)` function draws: inputs plus, per head, `label_<head>` int32 and `weight_<head>` float32
(0 = no label: frames at a tone's edge, padding, the zero rows that fill a micro-batch). Batches are a
function of the step, so the data position is the step itself and a resumed run draws the same rows.
Its evaluation is the accuracy over the labelled positions of fixed held-out rows.

DTMF: `dtmf_rows` draws clips with `rwkv_jax.data.dtmf_signal` (the tones of the ASR task), computes
Whisper features for a `chunk_seconds` window and labels each encoder position with the digit whose tone
covers it, silence, or nothing where the position straddles a tone's edge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models.layers import Linear
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.train import loop, optimizer
from rwkv_jax import data
from rwkv_jax.encoders import audio as audio_lib
from rwkv_jax.encoders import whisper

Array = jax.Array
Rows = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Head:
    """A linear classifier on the encoder's features: one label per position, or per item (`pooled`: the
    mean over the item's valid positions)."""

    name: str
    classes: int
    pooled: bool = False


class EncoderWithHeads(nn.Module):
    """`encoder` then one Linear head per `heads` entry: apply(vars, *encoder_inputs) -> {head: logits},
    [B, N, classes] per position or [B, classes] pooled. Parameters: {'encoder', 'head_<name>'}."""

    encoder: nn.Module
    heads: tuple[Head, ...]
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, *inputs: Array) -> dict[str, Array]:
        out = self.encoder(*inputs)
        features, lengths = out if isinstance(out, tuple) else (out, None)  # [B, N, D], [B] or None
        logits = {}
        for head in self.heads:
            x = features
            if head.pooled:
                valid = jnp.ones(features.shape[:2], bool)
                if lengths is not None:
                    valid = jnp.arange(features.shape[1])[None, :] < lengths[:, None]
                weights = valid.astype(features.dtype)[..., None]  # [B, N, 1]
                x = jnp.sum(features * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)  # [B, D]
            logits[head.name] = Linear(head.classes, ("embed", None), True, dtype=features.dtype,
                                       param_dtype=jnp.float32, peft=self.peft, name=f"head_{head.name}")(x)
        return logits


def init_params(module: EncoderWithHeads, encoder_params: Any, example: Sequence[Array], seed: int) -> Any:
    """Parameters of `module`: the given encoder's, heads from the module's initialisers (key `seed`).
    `example`: one batch of encoder inputs (shapes only matter)."""
    fresh = nn.unbox(module.init(jax.random.key(seed), *example)["params"])
    params = {**{k: v for k, v in fresh.items() if k != "encoder"}, "encoder": encoder_params}
    return jax.device_get(params)


def head_sums(logits: dict[str, Array], batch: dict[str, Array], heads: Sequence[Head]
              ) -> tuple[Array, Array, Array]:
    """(summed cross-entropy, correct predictions, labelled positions) over every head, weighted by
    `weight_<head>` (0 where there is no label)."""
    nll = correct = count = jnp.zeros((), jnp.float32)
    for head in heads:
        labels, weights = batch[f"label_{head.name}"], batch[f"weight_{head.name}"].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[head.name].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.clip(labels, 0, head.classes - 1)[..., None], axis=-1)[..., 0]
        nll -= jnp.sum(picked * weights)
        correct += jnp.sum((jnp.argmax(logp, axis=-1) == labels) * weights)
        count += jnp.sum(weights)
    return nll, correct, count


def label_weight(rows: Rows, heads: Sequence[Head]) -> float:
    """Labelled positions of `rows` over all heads."""
    return float(sum(np.sum(rows[f"weight_{h.name}"]) for h in heads))


def check_rows(rows: Rows, input_keys: Sequence[str], heads: Sequence[Head], source: str) -> int:
    """The row count of `rows`; raises naming `source` when an input, label or weight is missing or the
    leading dimensions disagree."""
    need = list(input_keys) + [f"{kind}_{h.name}" for h in heads for kind in ("label", "weight")]
    missing = [k for k in need if k not in rows]
    if missing:
        raise ValueError(f"{source}: rows lack {missing}; they need {need}")
    sizes = {k: np.shape(rows[k])[0] for k in need}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{source}: the arrays hold different row counts: {sizes}")
    return next(iter(sizes.values()))


class EncoderPretrainTask:
    """Trains `module` (an EncoderWithHeads) from `init_params` on rows `sample(step)` draws (the global
    batch, `config.pretrain.batch_size` rows; this host keeps its share); evaluates head accuracy on
    `heldout` rows. `input_keys` name the rows that go to the encoder, in its argument order."""

    name = "encoder_pretrain"
    eval_metric = "heldout_accuracy"
    progress_keys = ("loss", "accuracy", "grad_norm")
    updates_per_batch = 1

    def __init__(self, c: ml_collections.ConfigDict, module: EncoderWithHeads, init_params: Any,
                 sample: Callable[[int], Rows], heldout: Rows, input_keys: Sequence[str] = ("inputs",)):
        p = c.pretrain
        if p.batch_size < 1 or p.micro_batch_size < 1:
            raise loop.ConfigError("config pretrain.batch_size and pretrain.micro_batch_size must be >= 1")
        if p.batch_size % jax.process_count():
            raise loop.ConfigError(f"config pretrain.batch_size={p.batch_size} must divide over "
                                   f"{jax.process_count()} hosts")
        self.c, self.base_module, self.init_params = c, module, init_params
        self.sample, self.input_keys, self.heads = sample, tuple(input_keys), tuple(module.heads)
        check_rows(heldout, self.input_keys, self.heads, "held-out rows")
        self.heldout = heldout
        self.micro_batch_size = p.micro_batch_size
        self.data_files: dict[str, str] = {}
        self.last_step = 0

    def setup(self, mesh: Mesh) -> loop.Setup:
        abstract = jax.eval_shape(lambda: self.init_params)
        boxed = jax.eval_shape(self.base_module.init, jax.random.key(0),
                               *[jnp.zeros((1,) + self.heldout[k].shape[1:], self.heldout[k].dtype)
                                 for k in self.input_keys])["params"]
        if jax.tree.structure(abstract) != jax.tree.structure(nn.unbox(boxed)):
            raise loop.ConfigError("EncoderPretrainTask: init_params do not have the module's parameter tree")
        axes = jax.tree.map(tuple, nn.get_partition_spec(boxed),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        params = jax.device_put(self.init_params, mesh_lib.param_shardings(boxed, mesh))
        self.method = registry.from_config(self.c.peft).prepare(params)
        self.module = self.base_module.clone(peft=self.method, encoder=self.base_module.encoder.clone(peft=self.method))
        self._eval_fn = jax.jit(self._sums)
        return loop.Setup(params, axes, self.method)

    # ------------------------------------------------------------------ batches
    def data_state(self) -> Any:
        return {"step": self.last_step}

    def restore_data_state(self, state: Any) -> None:
        self.last_step = int(state["step"])  # the rows of a step depend on the step alone

    def next_batch(self, step: int, frozen: Any, adapter: Any) -> tuple[Rows, dict[str, float], dict[str, float]]:
        """This host's share of the rows of `step`, and the labelled positions of the whole batch."""
        del frozen, adapter
        rows = self.sample(step)
        count = check_rows(rows, self.input_keys, self.heads, f"sample({step})")
        if count != self.c.pretrain.batch_size:
            raise ValueError(f"sample({step}) drew {count} rows, config pretrain.batch_size is "
                             f"{self.c.pretrain.batch_size}")
        self.last_step = step
        share = count // jax.process_count()
        me = jax.process_index()
        rows = {k: v[me * share:(me + 1) * share] for k, v in rows.items()}
        totals = {"labels": float(mesh_lib.gather_hosts(label_weight(rows, self.heads)).sum())}
        return rows, totals, {}

    # ------------------------------------------------------------------ the loss
    def _sums(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> tuple[Array, Array, Array]:
        variables = self.method.model_variables(frozen["base"], adapter)
        logits = self.module.apply(variables, *[batch[k] for k in self.input_keys])
        return head_sums(logits, batch, self.heads)

    def pre_update(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> dict[str, Array]:
        return {}

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, Array], totals: dict[str, Array]
             ) -> tuple[Array, dict[str, Array]]:
        """Summed cross-entropy of one micro-batch over the step's labelled positions."""
        nll, correct, count = self._sums(frozen, adapter, batch)
        return nll / jnp.maximum(totals["labels"], 1.0), {"accuracy": correct, "weight": count}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, frozen: Any, adapter: Any) -> float:
        """Accuracy over the labelled positions of the held-out rows (all heads together)."""
        correct = count = 0.0
        size = self.micro_batch_size
        total = next(iter(self.heldout.values())).shape[0]
        for start in range(0, total, size):
            chunk = {k: v[start:start + size] for k, v in self.heldout.items()}
            n = next(iter(chunk.values())).shape[0]
            if n < size:  # rows of zeros (weight 0) keep one compiled shape
                chunk = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
            _, c, w = self._eval_fn(frozen, adapter, chunk)
            correct, count = correct + float(c), count + float(w)
        return correct / max(count, 1.0)

    def trained_params(self, frozen: Any, adapter: Any) -> Any:
        """The module's parameters with the adapter folded in (the encoder's are under 'encoder')."""
        return jax.device_get(registry.merge(self.method, frozen["base"], adapter))

    def close(self) -> None:
        pass


def config(**overrides: Any) -> ml_collections.ConfigDict:
    """A run config for EncoderPretrainTask: every field the core reads, full fine-tuning, AdamW with a
    cosine schedule; `overrides` update the top level."""
    c = ml_collections.ConfigDict()
    c.task = "encoder_pretrain"
    c.seed = 0
    c.peft = ml_collections.ConfigDict(dict(name="full", hparams=ml_collections.ConfigDict()))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.pretrain = ml_collections.ConfigDict(dict(batch_size=32, micro_batch_size=32))
    c.optim = optimizer.config(learning_rate=2e-3, schedule="cosine", warmup_steps=30, weight_decay=0.01,
                               decay="matrices", b2=0.98)
    c.steps = 400
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
    c.update(overrides)
    return c


# ---------------------------------------------------------------------------------------------
# DTMF frame labels for a Whisper-style encoder

SILENCE = 10  # class of a frame with no tone; digits are their own classes 0-9
DTMF_CLASSES = 11
FRAME_SAMPLES = 2 * audio_lib.WHISPER_HOP  # samples per encoder position (20 ms)


def dtmf_frame_labels(digits: str, spans: Sequence[tuple[int, int]], samples: int, positions: int,
                      chunk_seconds: int, edge: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """(labels [positions] int32, weights [positions] float32) of one clip. Encoder position j covers the
    20 ms around sample 320 j (its mel frames are centred there): the digit whose tone covers at least
    `edge` of it, silence when tones cover at most 1 - `edge`, else no label (weight 0). Positions past
    what ModRWKV keeps (mask.sum() // 2 + 1) get no label."""
    if len(digits) != len(spans):
        raise ValueError(f"dtmf_frame_labels: {len(digits)} digits but {len(spans)} spans")
    centres = np.arange(positions) * FRAME_SAMPLES
    low, high = centres - FRAME_SAMPLES // 2, centres + FRAME_SAMPLES // 2
    cover = np.zeros((positions, len(spans)))
    for i, (start, end) in enumerate(spans):
        cover[:, i] = np.clip(np.minimum(high, end) - np.maximum(low, start), 0, None) / FRAME_SAMPLES
    labels = np.full(positions, SILENCE, np.int32)
    weights = np.zeros(positions, np.float32)
    if spans:
        best = np.argmax(cover, axis=1)
        tone = cover[np.arange(positions), best] >= edge
        labels[tone] = np.asarray([int(d) for d in digits], np.int32)[best[tone]]
        weights[tone] = 1.0
    weights[cover.sum(axis=1) <= 1 - edge] = 1.0
    weights[data.whisper_frames(samples, chunk_seconds):] = 0.0
    return labels, weights


def dtmf_rows(rng: np.random.Generator, count: int, chunk_seconds: int, n_mels: int = 80,
              min_digits: int = 1, max_digits: int = 8) -> tuple[Rows, list[str]]:
    """`count` DTMF clips as encoder rows {'inputs' [count, n_mels, 100 * chunk_seconds] (log-mel),
    'attention_mask' [count, frames], 'label_frames' / 'weight_frames' [count, 50 * chunk_seconds]} and
    their digit strings."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"dtmf_rows: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    positions = audio_lib.whisper_mel_frames(chunk_seconds) // 2
    waves, labels, weights, strings = [], [], [], []
    for _ in range(count):
        digits = "".join(str(d) for d in rng.integers(0, 10, rng.integers(min_digits, max_digits + 1)))
        wave, spans = data.dtmf_signal(digits, rng)
        if wave.size > chunk_seconds * data.SAMPLING_RATE:
            raise ValueError(f"dtmf_rows: a {len(digits)}-digit clip lasts {wave.size / data.SAMPLING_RATE:.2f} s, "
                             f"longer than the {chunk_seconds} s window; lower max_digits")
        label, weight = dtmf_frame_labels(digits, spans, wave.size, positions, chunk_seconds)
        waves.append(wave)
        labels.append(label)
        weights.append(weight)
        strings.append(digits)
    features, mask = audio_lib.whisper_features(waves, n_mels, chunk_seconds=chunk_seconds)
    return {"inputs": features, "attention_mask": mask, "label_frames": np.stack(labels),
            "weight_frames": np.stack(weights)}, strings


def collapse_frames(predictions: np.ndarray, length: int) -> str:
    """The digit string of per-position predictions [positions] (classes 0-9 and SILENCE) over the first
    `length` positions: runs of one digit, split by silence or by a change of digit, give one digit each."""
    out, previous = [], SILENCE
    for label in np.asarray(predictions)[:length]:
        if label != SILENCE and label != previous:
            out.append(str(int(label)))
        previous = label
    return "".join(out)


def init_whisper(cfg: whisper.WhisperEncoderConfig, seed: int) -> dict:
    """A new Whisper encoder's params: the module's initialisers, except variance-preserving convolutions
    (std 1/sqrt(fan_in), so the mel features are not drowned by the positions at the start) and Whisper's
    sinusoidal positions."""
    example = jnp.zeros((1, cfg.num_mel_bins, 2 * cfg.max_source_positions), jnp.dtype(cfg.param_dtype))
    params = nn.unbox(whisper.WhisperEncoder(cfg).init(jax.random.key(seed), example)["params"])
    for index, name in enumerate(("conv1", "conv2")):
        kernel = params[name]["kernel"]  # [3 * in, out]
        params[name]["kernel"] = (jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1 + index), kernel.shape)
                                  / np.sqrt(kernel.shape[0])).astype(kernel.dtype)
    params["embed_positions"] = jnp.asarray(whisper.sinusoids(cfg.max_source_positions, cfg.d_model),
                                            jnp.dtype(cfg.param_dtype))
    return jax.device_get(params)
