"""Pretraining of a modality encoder on the one training core: the encoder plus linear classification heads
that read labelled attributes off its features (`AttributeTask`, a `loop.Task`).

It stands in for the real pretraining of an encoder in the tiny embedded defaults (an encoder that
"stands for a pretrained one"): what a head can read from the features, the connector and language
model trained after it can read too. Generic over the encoder: any linen module called with the named
input arrays of a batch, returning features [B, N, D] or (features, valid lengths [B]) as the audio
towers do. The SigLIP tower of assets/tiny-modrwkv learns shapes' attributes from a fixed image set
(launch/make_tiny_modrwkv.py); the Whisper encoder of assets/tiny-asr learns which DTMF digit sounds at
each 20 ms position from clips drawn afresh every step (launch/make_tiny_asr.py).

Heads read either the mean of the valid features (`pooling='mean'`) or every position on its own
(`'tokens'`: each position must carry the attribute, so any one of them tells it). Labels are integers
per example ([examples], -1: this example has no label for the head) or, with 'tokens', per position
([examples, N], -1 where unlabelled; the caller leaves positions past an item's valid length unlabelled).
Training examples are a fixed `AttributeData` read in shuffled epochs, or a function of the step that
draws each step's examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models.layers import Linear
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.train import loop

Array = jax.Array
POOLING = ("mean", "tokens")
EVAL_ROWS = 256  # held-out rows per evaluation batch


@dataclasses.dataclass
class AttributeData:
    """Encoder inputs {name: [examples, ...]} and labels {head: [examples] or [examples, N]} (-1: none)."""

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    def __post_init__(self):
        sizes = {name: len(x) for name, x in {**self.inputs, **self.labels}.items()}
        if not self.inputs or len(set(sizes.values())) != 1:
            raise ValueError(f"AttributeData: every input and label array needs the same number of examples "
                             f"(and at least one input), got {sizes}")
        for name, y in self.labels.items():
            if not np.issubdtype(y.dtype, np.integer) or y.ndim not in (1, 2) or y.min() < -1:
                raise ValueError(f"AttributeData: labels {name!r} must be integers >= -1 of shape [examples] or "
                                 f"[examples, positions], got {y.dtype} {y.shape}")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `index` as batch rows; labels shifted by one (0: none), so a row of zeros (the
        loop's padding) holds no label."""
        rows = {f"input/{k}": v[index] for k, v in self.inputs.items()}
        rows.update({f"label/{k}": (v[index] + 1).astype(np.int32) for k, v in self.labels.items()})
        return rows


Sampler = Callable[[int], AttributeData]  # step -> that step's examples (exactly batch_size of them)


class Heads(nn.Module):
    """One linear classifier per head over features [..., D] -> {head: logits [..., classes]}."""

    heads: tuple[tuple[str, int], ...]
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, features: Array) -> dict[str, Array]:
        return {name: Linear(classes, ("embed", None), True, peft=self.peft, name=name)(features)
                for name, classes in self.heads}


class AttributeModel(nn.Module):
    """encoder -> heads. `__call__(inputs)` -> ({head: logits [B, K] ('mean') or [B, N, K] ('tokens')},
    valid [B, N]). Parameters {'encoder', 'heads'}."""

    encoder: nn.Module
    heads: tuple[tuple[str, int], ...]
    input_names: tuple[str, ...]
    pooling: str = "tokens"
    peft: PeftMethod | None = None

    @nn.compact
    def __call__(self, inputs: Mapping[str, Array]) -> tuple[dict[str, Array], Array]:
        out = self.encoder(*[inputs[name] for name in self.input_names])
        features, lengths = out if isinstance(out, tuple) else (out, None)  # [B, N, D]
        n = features.shape[1]
        valid = jnp.ones(features.shape[:2], bool) if lengths is None else jnp.arange(n)[None] < lengths[:, None]
        if self.pooling == "mean":
            weights = valid.astype(features.dtype)[..., None]
            features = jnp.sum(features * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)  # [B, D]
        return Heads(self.heads, self.peft, name="heads")(features), valid


def head_sums(logits: Array, labels: Array, valid: Array) -> tuple[Array, Array, Array]:
    """(summed cross-entropy, correct predictions, labelled items) of one head over a batch.

    labels (shifted: 0 = none) [B] with logits [B, K]: an item per labelled example. [B] with logits
    [B, N, K]: an item per labelled example, its loss and accuracy the mean over its valid positions.
    [B, N] with logits [B, N, K]: an item per labelled position."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.maximum(labels - 1, 0)
    labelled = labels > 0
    if logits.ndim == 3 and labels.ndim == 1:  # one label per example, read at every valid position
        target = jnp.broadcast_to(target[:, None], logits.shape[:2])
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logp, axis=-1) == target).astype(jnp.float32)
    if logits.ndim == 3 and labels.ndim == 1:
        weights = valid.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(weights, 1), 1.0)
        nll, correct = jnp.sum(nll * weights, 1) / count, jnp.sum(correct * weights, 1) / count  # [B]
    mask = labelled.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)


def scratch_init(params: Any, key: Array) -> Any:
    """`params` re-drawn for training from scratch: every kernel normal with std 1/sqrt(fan_in), every other
    table of two or more dims (position embeddings) with std 1/sqrt(its last dim); biases and norm gains
    kept. (The loaders' placeholder init, normal(0.02), leaves position embeddings too small to learn
    where things are within a few minutes.)"""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(params))
    out = []
    for index, (path, value) in enumerate(leaves):
        value, name = np.asarray(value), str(getattr(path[-1], "key", path[-1]))
        if value.ndim >= 2:
            fan = value.shape[0] if name == "kernel" else value.shape[-1]
            value = np.asarray(jax.random.normal(jax.random.fold_in(key, index), value.shape) / np.sqrt(fan),
                               value.dtype)
        out.append(value)
    return jax.tree.unflatten(treedef, out)


def config(**overrides: Any) -> ml_collections.ConfigDict:
    """A run config with every field the core and the task read (full fine-tuning, AdamW, cosine)."""
    c = ml_collections.ConfigDict(dict(
        task="attributes", seed=0, steps=1000, eval_every=0, checkpoint_every=1000, log_every=100,
        mesh=ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)),
        peft=ml_collections.ConfigDict(dict(name="full", hparams=ml_collections.ConfigDict())),
        pretrain=ml_collections.ConfigDict(dict(batch_size=64, micro_batch_size=64, pooling="tokens")),
        optim=ml_collections.ConfigDict(dict(
            learning_rate=2e-3, schedule="cosine", warmup_steps=50, end_learning_rate=0.0, weight_decay=0.01,
            decay="matrices", b1=0.9, b2=0.99, eps=1e-8, grad_clip=1.0, loraplus_ratio=16.0))))
    c.update(overrides)
    return c


class AttributeTask:
    """Trains an encoder and its attribute heads (any PEFT method; the embedded defaults use 'full').

    `heads`: {name: classes}; `input_names`: the inputs the encoder takes, in order. `train` is either an
    `AttributeData` read in epochs, each a shuffle seeded by (seed, epoch), the data position (epoch, row);
    or a function `step -> AttributeData` of exactly `batch_size` fresh examples, the data position the
    step (a resumed run draws the same examples). The evaluation is the mean over heads of the held-out
    accuracy (`accuracies` gives each head's)."""

    name = "attributes"
    eval_metric = "heldout_accuracy"
    progress_keys = ("loss", "accuracy", "grad_norm")
    updates_per_batch = 1

    def __init__(self, c: ml_collections.ConfigDict, encoder: nn.Module, encoder_params: Any,
                 heads: Mapping[str, int], input_names: Sequence[str], train: AttributeData | Sampler,
                 heldout: AttributeData | None = None):
        p = c.pretrain
        if p.pooling not in POOLING:
            raise loop.ConfigError(f"config pretrain.pooling must be one of {POOLING}, got {p.pooling!r}")
        if p.batch_size < 1 or p.micro_batch_size < 1 or p.batch_size % jax.process_count():
            raise loop.ConfigError(f"config pretrain.batch_size ({p.batch_size}) and micro_batch_size must be >= 1, "
                                   f"the batch divisible over {jax.process_count()} hosts")
        if not isinstance(train, AttributeData) and not callable(train):
            raise TypeError(f"AttributeTask: train must be an AttributeData or a function step -> AttributeData, "
                            f"got {type(train).__name__}")
        self.c = c
        self.micro_batch_size = p.micro_batch_size
        self.data_files: dict[str, str] = {}
        self.encoder, self.encoder_params = encoder, encoder_params
        self.heads = tuple((name, int(k)) for name, k in heads.items())
        self.input_names = tuple(input_names)
        self.sampled = not isinstance(train, AttributeData)
        for data, role in ((train, "train"), (heldout, "heldout")):
            if isinstance(data, AttributeData):
                self.check(data, role)
        self.train, self.heldout = train, heldout
        self.position = {"step": 0} if self.sampled else {"epoch": 0, "row": 0}
        self._order: dict[int, np.ndarray] = {}
        self._eval_fn = None

    def check(self, data: AttributeData, role: str) -> None:
        """Raises, naming `role`, unless `data` has a label array for every head within its classes and
        every input the encoder takes."""
        heads = dict(self.heads)
        if set(data.labels) != set(heads) or not set(self.input_names) <= set(data.inputs):
            raise ValueError(f"AttributeTask: {role} data has labels {sorted(data.labels)} and inputs "
                             f"{sorted(data.inputs)}; the heads are {sorted(heads)}, the encoder takes "
                             f"{list(self.input_names)}")
        for name, y in data.labels.items():
            if y.max() >= heads[name]:
                raise ValueError(f"AttributeTask: {role} labels of {name!r} reach {y.max()}, the head has "
                                 f"{heads[name]} classes")
            if y.ndim == 2 and self.c.pretrain.pooling != "tokens":
                raise loop.ConfigError(f"AttributeTask: per-position labels ({name!r}) need pooling 'tokens'")

    def model(self, peft: PeftMethod | None = None) -> AttributeModel:
        return AttributeModel(self.encoder.clone(peft=peft), self.heads, self.input_names, self.c.pretrain.pooling,
                              peft=peft)

    def setup(self, mesh: jax.sharding.Mesh) -> loop.Setup:
        shapes = self.train if not self.sampled else self.heldout if self.heldout is not None else self.train(1)
        example = {f"input/{k}": v[:1] for k, v in shapes.inputs.items()}
        key = jax.random.fold_in(jax.random.key(self.c.seed), loop.ADAPTER + 100)  # the heads' init
        bare = self.model()
        init = lambda k: bare.init(k, _inputs(example))["params"]  # noqa: E731
        abstract = jax.eval_shape(init, key)
        heads = nn.unbox(init(key)["heads"])
        params = {"encoder": jax.tree.map(np.asarray, nn.unbox(self.encoder_params)),
                  "heads": jax.tree.map(np.asarray, heads)}
        specs = nn.get_partition_spec(abstract)
        axes = jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        self.method = registry.from_config(self.c.peft).prepare(params)
        self.module = self.model(self.method)
        params = jax.tree.map(jnp.asarray, params)
        return loop.Setup(params, axes, self.method)

    # ------------------------------------------------------------------ batches
    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order:
            self._order = {epoch: np.random.default_rng([self.c.seed, epoch]).permutation(len(self.train))}
        return self._order[epoch]

    def data_state(self) -> Any:
        return dict(self.position)

    def restore_data_state(self, state: Any) -> None:
        self.position = {key: int(state[key]) for key in (("step",) if self.sampled else ("epoch", "row"))}

    def next_batch(self, step: int, frozen: Any, adapter: Any
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """This host's share of the step's `batch_size` examples (the next ones of the epoch, continuing into
        the next, or those `train(step)` draws) and the labelled items of the whole batch."""
        del frozen, adapter
        if self.sampled:
            data, index = self._drawn(step), np.arange(self.c.pretrain.batch_size)
            metrics = {}
        else:
            data, index = self.train, self._next_rows()
            metrics = {"epoch": self.position["epoch"] + self.position["row"] / len(self.train)}
        share = len(index) // jax.process_count()
        rows = data.rows(index[jax.process_index() * share:(jax.process_index() + 1) * share])
        items = sum(float((rows[f"label/{name}"] > 0).sum()) for name, _ in self.heads)  # labelled items
        totals = {"labels": float(mesh_lib.gather_hosts(items).sum())}
        return rows, totals, metrics

    def _next_rows(self) -> np.ndarray:
        """The indices of the next `batch_size` examples of the shuffled epochs; advances the position."""
        take: list[np.ndarray] = []
        need = self.c.pretrain.batch_size
        while need:
            order, at = self.order(self.position["epoch"]), self.position["row"]
            take.append(order[at:at + need])
            need -= len(take[-1])
            self.position["row"] = at + len(take[-1])
            if self.position["row"] >= len(order):
                self.position = {"epoch": self.position["epoch"] + 1, "row": 0}
        return np.concatenate(take)

    def _drawn(self, step: int) -> AttributeData:
        """The examples `train(step)` draws, checked; the position becomes `step`."""
        data = self.train(step)
        if not isinstance(data, AttributeData):
            raise TypeError(f"AttributeTask: train({step}) returned {type(data).__name__}, not AttributeData")
        self.check(data, f"train({step})")
        if len(data) != self.c.pretrain.batch_size:
            raise ValueError(f"AttributeTask: train({step}) drew {len(data)} examples, config pretrain.batch_size "
                             f"is {self.c.pretrain.batch_size}")
        self.position = {"step": step}
        return data

    # ------------------------------------------------------------------ the loss
    def _sums(self, frozen: Any, adapter: Any, batch: Mapping[str, Array]) -> dict[str, tuple[Array, Array, Array]]:
        variables = self.method.model_variables(frozen["base"], adapter)
        logits, valid = self.module.apply(variables, _inputs(batch))
        return {name: head_sums(logits[name], batch[f"label/{name}"], valid) for name, _ in self.heads}

    def pre_update(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> dict[str, Array]:
        return {}

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, Array], totals: dict[str, Array]
             ) -> tuple[Array, dict[str, Array]]:
        """Summed cross-entropy of every labelled item of the micro-batch over the step's labelled items."""
        sums = self._sums(frozen, adapter, batch)
        nll = sum(s[0] for s in sums.values())
        return nll / jnp.maximum(totals["labels"], 1.0), {"weight": sum(s[2] for s in sums.values()),
                                                          "accuracy": sum(s[1] for s in sums.values())}

    # ------------------------------------------------------------------ evaluation
    def accuracies(self, frozen: Any, adapter: Any, data: AttributeData | None = None) -> dict[str, float]:
        """Each head's accuracy on `data` (default the held-out set); heads without a label there are left out."""
        data = data if data is not None else self.heldout
        if data is None:
            return {}
        if self._eval_fn is None:
            self._eval_fn = jax.jit(lambda f, a, b: {k: s[1:] for k, s in self._sums(f, a, b).items()})
        correct = {name: 0.0 for name, _ in self.heads}
        count = dict(correct)
        for start in range(0, len(data), EVAL_ROWS):
            index = np.arange(start, min(start + EVAL_ROWS, len(data)))
            rows = data.rows(np.pad(index, (0, EVAL_ROWS - len(index)), mode="edge"))
            for name in data.labels:  # the repeated last example pads the batch: no labels there
                rows[f"label/{name}"][len(index):] = 0
            for name, (c, n) in jax.device_get(self._eval_fn(frozen, adapter, rows)).items():
                correct[name] += float(c)
                count[name] += float(n)
        return {name: correct[name] / count[name] for name in correct if count[name]}

    def evaluate(self, frozen: Any, adapter: Any) -> float:
        """Mean held-out accuracy over the heads (0 without held-out data)."""
        accuracies = self.accuracies(frozen, adapter)
        return float(np.mean(list(accuracies.values()))) if accuracies else 0.0

    def close(self) -> None:
        pass


def _inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's inputs of a batch (its 'input/<name>' entries, by name)."""
    return {k.removeprefix("input/"): v for k, v in batch.items() if k.startswith("input/")}


def trained_params(run: loop.Run) -> Any:
    """The model's parameters {'encoder', 'heads'} after a run (the PEFT method's adapter merged into them)."""
    return registry.merge(run.method, run.frozen["base"], run.state.adapter)


def trained_encoder(run: loop.Run) -> Any:
    """The encoder's parameters after a run (the PEFT method's adapter merged into them)."""
    return trained_params(run)["encoder"]
