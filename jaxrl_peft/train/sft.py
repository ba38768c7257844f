"""The supervised task: next-token cross-entropy on (prompt, completion) pairs, trained by the core.

The loss is the mean negative log-likelihood over completion tokens only (prompt tokens are context,
never targets), normalised by the completion tokens of the whole step, so micro-batches add up to the
batch. Examples are packed into rows of `seq_len` tokens (positions restart and attention stays
within each example through segment ids) when the model's family allows it; otherwise (RWKV-7, whose
state cannot reset at a segment boundary) each row holds one example. Each epoch is a seeded shuffle, so the data position is
(epoch, row) and a resumed run reads exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_peft.data import prompts as prompt_lib, synthetic
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import family, hf, hub
from jaxrl_peft.peft import registry
from jaxrl_peft.train import loop

Array = jax.Array
Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, completion ids)


def pack(lengths: Sequence[int], seq_len: int, packs: bool = True) -> list[list[int]]:
    """Greedy packing of examples (in the given order) into rows of at most `seq_len` tokens; one
    example per row when `packs` is False (a family that cannot tell segments apart)."""
    rows: list[list[int]] = []
    used = seq_len
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {seq_len}")
        if used + n > seq_len or not packs:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def make_batch(rows: Sequence[Sequence[Example]], pad_id: int, seq_len: int) -> dict[str, np.ndarray]:
    """One row per entry of `rows`, each the concatenation of its (prompt + completion) examples.

    Returns [N, T] arrays: tokens; positions restarting at 0 for every example; segment_ids (1, 2, ...
    per example, 0 on the padding, which attends only to itself); loss_mask, True on completion tokens.
    """
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    positions = np.zeros((n, seq_len), np.int32)
    segments = np.zeros((n, seq_len), np.int32)
    target = np.zeros((n, seq_len), bool)
    for r, row in enumerate(rows):
        at = 0
        for s, (prompt, completion) in enumerate(row, start=1):
            k = len(prompt) + len(completion)
            if at + k > seq_len:
                raise ValueError(f"row {r} holds {at + k} tokens, more than the row length {seq_len}")
            tokens[r, at:at + k] = list(prompt) + list(completion)
            positions[r, at:at + k] = np.arange(k)
            segments[r, at:at + k] = s
            target[r, at + len(prompt):at + k] = True
            at += k
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_mask": target}


def check_examples(examples: Sequence[Example], seq_len: int, source: str = "sft") -> list[int]:
    """Lengths of `examples`; each needs a prompt and a completion token and must fit a row."""
    if not examples:
        raise loop.ConfigError(f"{source}: no examples")
    lengths = []
    for i, (prompt, completion) in enumerate(examples):
        if not prompt or not completion:
            raise loop.ConfigError(f"{source}: example {i} needs at least one prompt and one completion token")
        lengths.append(len(prompt) + len(completion))
        if lengths[-1] > seq_len:
            raise loop.ConfigError(f"{source}: example {i} has {lengths[-1]} tokens, more than "
                                   f"sft.seq_len={seq_len}")
    return lengths


def read_examples(path: str | Path, tokenizer: hf.Tokenizer, eos_id: int | None) -> list[Example]:
    """A JSONL file of {"prompt": text, "completion": text} records, tokenised (the completion ends with
    the stop token). A bad line is an error that names the file and the line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, completion = record["prompt"], record["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise loop.ConfigError(f"{path}:{n}: expected a JSON object with 'prompt' and 'completion' "
                                       f"strings ({e})") from e
            out.append((tokenizer.encode(prompt), tokenizer.encode(completion) + ([eos_id] if eos_id is not None
                                                                                  else [])))
    return out


THINK = "<think>\n"


def synthetic_examples(tokenizer: hf.Tokenizer, count: int, seed: int, kinds: Sequence[str],
                       levels: Sequence[int], template: str) -> list[Example]:
    """Worked R1-style solutions of synthetic problems (the embedded default's data): the prompt ends
    with the chat template's `<think>\n`, the completion is the rest of the solution and the stop token."""
    out = []
    for p in synthetic.generate(count, seed, tuple(kinds), tuple(levels)):
        prompt = prompt_lib.build_prompt(p.problem, tokenizer, template)
        solution = p.r1_solution()
        if not (prompt.endswith(THINK) and solution.startswith(THINK)):
            raise loop.ConfigError("sft: the chat template's generation prompt must end with '<think>\n'")
        out.append((tokenizer.encode(prompt), tokenizer.encode(solution[len(THINK):]) + [tokenizer.eos_id]))
    return out


def nll_sums(logp: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(sum of -log p over target tokens, number of target tokens). logp [N, T-1] predicts tokens[:, 1:]."""
    weights = loss_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(logp * weights), jnp.sum(weights)


class SFTTask:
    """Supervised fine-tuning of a model of either family with any PEFT method (full fine-tuning included).

    Examples come from `examples` (token pairs) or the JSONL file `config.data.train`; held-out
    examples from `heldout` or `config.data.heldout` (none: the evaluation reports 0)."""

    name = "sft"
    eval_metric = "heldout_loss"
    progress_keys = ("loss", "token_accuracy", "grad_norm")
    updates_per_batch = 1

    def __init__(self, c: ml_collections.ConfigDict, examples: Sequence[Example] | None = None,
                 heldout: Sequence[Example] | None = None):
        s = c.sft
        if s.batch_size < 1 or s.seq_len < 2 or s.micro_batch_size < 1:
            raise loop.ConfigError("config sft.batch_size and sft.micro_batch_size must be >= 1, sft.seq_len >= 2")
        if s.batch_size % jax.process_count():
            raise loop.ConfigError(f"config sft.batch_size={s.batch_size} must divide over "
                                   f"{jax.process_count()} hosts")
        self.c = c
        self.micro_batch_size = s.micro_batch_size
        self.data_files = {role: c.data.get(role, "") for role in ("train", "heldout")}
        self._examples, self._heldout = examples, heldout
        self.position = {"epoch": 0, "row": 0}

    def setup(self, mesh: jax.sharding.Mesh) -> loop.Setup:
        c = self.c
        self.mesh = mesh
        path = hub.resolve_model(c.model.checkpoint, c.model.get("revision") or None).path
        self.data_files["model"] = str(path)
        base_family, params = family.load(path, dtype=c.model.param_dtype, compute_dtype=c.model.dtype, mesh=mesh)
        self.method = registry.from_config(c.peft).prepare(params)
        self.family = base_family.with_peft(self.method, remat=c.model.remat)
        self.cfg = self.family.config
        self.model = self.family.module
        self.tokenizer = self.family.tokenizer()
        self.pad_id = self.tokenizer.pad_id
        self.examples = list(self._examples if self._examples is not None else self._read("train"))
        self.lengths = check_examples(self.examples, c.sft.seq_len, "sft training data")
        self.heldout = list(self._heldout if self._heldout is not None else self._read("heldout"))
        if self.heldout:
            check_examples(self.heldout, c.sft.seq_len, "sft held-out data")
        self._epoch_rows: dict[int, list[list[int]]] = {}
        return loop.Setup(params, self.family.param_axes(), self.method)

    def _read(self, role: str) -> list[Example]:
        """config.data.<role>: a JSONL file, 'synthetic' (worked synthetic solutions) or '' (none)."""
        d = self.c.data
        source = d.get(role, "")
        if source == "synthetic":
            seed = d.synthetic_seed + (0 if role == "train" else 1_000_003)
            count = d.synthetic_size if role == "train" else d.heldout_size
            return synthetic_examples(self.tokenizer, count, seed, d.synthetic_kinds, d.synthetic_levels,
                                      d.template)
        return read_examples(source, self.tokenizer, self.tokenizer.eos_id) if source else []

    # ------------------------------------------------------------------ batches
    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """The packed rows (example indices) of `epoch`: a shuffle seeded by (seed, epoch)."""
        if epoch not in self._epoch_rows:
            self._epoch_rows = {epoch: []}
            order = np.random.default_rng([self.c.seed, epoch]).permutation(len(self.examples))
            self._epoch_rows[epoch] = [[int(order[j]) for j in row]
                                       for row in pack([self.lengths[j] for j in order], self.c.sft.seq_len,
                                                       self.family.packs_segments)]
        return self._epoch_rows[epoch]

    def data_state(self) -> Any:
        return dict(self.position)

    def restore_data_state(self, state: Any) -> None:
        self.position = {"epoch": int(state["epoch"]), "row": int(state["row"])}

    def next_batch(self, step: int, frozen: Any, adapter: Any
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """The next `batch_size` packed rows (this host's share), continuing into the next epoch."""
        del step, frozen, adapter
        take: list[list[int]] = []
        while len(take) < self.c.sft.batch_size:
            rows = self.epoch_rows(self.position["epoch"])
            need = self.c.sft.batch_size - len(take)
            at = self.position["row"]
            take += rows[at:at + need]
            self.position["row"] = at + need
            if self.position["row"] >= len(rows):
                self.position = {"epoch": self.position["epoch"] + 1, "row": 0}
        hosts, me = jax.process_count(), jax.process_index()
        share = len(take) // hosts
        mine = take[me * share:(me + 1) * share]
        batch = make_batch([[self.examples[j] for j in row] for row in mine], self.pad_id, self.c.sft.seq_len)
        totals = {"tokens": float(mesh_lib.gather_hosts(batch["loss_mask"][:, 1:].sum()).sum())}
        metrics = {"epoch": self.position["epoch"] + self.position["row"] / max(len(self.epoch_rows(
            self.position["epoch"])), 1)}
        return batch, totals, metrics

    # ------------------------------------------------------------------ the loss
    def _logprobs(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> tuple[Array, Array]:
        variables = self.method.model_variables(frozen["base"], adapter)
        if not self.family.packs_segments:  # one right-padded example per row: nothing to tell apart
            return self.family.token_logprobs(variables, batch["tokens"])[0], batch["loss_mask"]
        return self.family.token_logprobs(variables, batch["tokens"], positions=batch["positions"],
                                          segment_ids=batch["segment_ids"])[0], batch["loss_mask"]

    def pre_update(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> dict[str, Array]:
        return {}

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, Array], totals: dict[str, Array]
             ) -> tuple[Array, dict[str, Array]]:
        """Summed completion-token NLL of one micro-batch over the step's completion tokens."""
        logp, mask = self._logprobs(frozen, adapter, batch)
        nll, count = nll_sums(logp, mask)
        return nll / jnp.maximum(totals["tokens"], 1.0), {"weight": count}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, frozen: Any, adapter: Any) -> float:
        """Mean NLL per completion token of the held-out examples (0 when there are none)."""
        if not self.heldout:
            return 0.0
        return heldout_loss(self._nll_fn, frozen, adapter, self.heldout, self.pad_id, self.c.sft.seq_len,
                            self.c.sft.micro_batch_size, self.family.packs_segments)

    def _nll_fn(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> tuple[Array, Array]:
        return nll_sums(*self._logprobs(frozen, adapter, batch))

    def close(self) -> None:
        pass


def heldout_loss(nll_fn: Any, frozen: Any, adapter: Any, examples: Sequence[Example], pad_id: int,
                 seq_len: int, batch_size: int, packs: bool = True) -> float:
    """Mean NLL per completion token of `examples` (packed in order unless `packs` is False; one
    compiled shape)."""
    fn = jax.jit(nll_fn)
    rows = pack(check_examples(examples, seq_len), seq_len, packs)
    nll = count = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = [[examples[j] for j in row] for row in rows[i:i + batch_size]]
        chunk += [[]] * (batch_size - len(chunk))  # empty rows: padding only, no targets
        s, c = fn(frozen, adapter, make_batch(chunk, pad_id, seq_len))
        nll, count = nll + float(s), count + float(c)
    return nll / max(count, 1.0)
