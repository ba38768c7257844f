"""The RL loop: prompts -> rollouts (G per prompt) -> rewards -> advantages -> filter -> updates.

One function, `train(config, workdir)`, runs a whole GRPO/DAPO/Dr.GRPO experiment with any PEFT
method: metrics every step (JSONL, TensorBoard, console), periodic held-out evaluation, orbax
checkpoints (adapter, optimizer and method state, data position, step) and exact resumption. A
non-finite loss or gradient stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxrl_peft import peft
from jaxrl_peft.data import loaders, pipeline, prompts as prompt_lib, synthetic
from jaxrl_peft.infra import checkpoint as ckpt_lib, memory, mesh as mesh_lib, metrics as metrics_lib
from jaxrl_peft.models import hf, transformer as tfm
from jaxrl_peft.peft import optim
from jaxrl_peft.rewards import math as reward_lib
from jaxrl_peft.rl import losses, rollout

Array = jax.Array
# Purposes for deriving keys from the seed: jax.random.fold_in(fold_in(seed_key, PURPOSE), step).
_ROLLOUT, _EVAL, _ADAPTER = 1, 2, 3


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the gradient norm is not finite; the last good checkpoint is kept."""


@dataclasses.dataclass
class Experience:
    """Training sequences of one step: prompt + completion, left-aligned, right-padded."""

    tokens: np.ndarray  # [B, L] int32
    loss_mask: np.ndarray  # [B, L-1] f32: 1 where tokens[:, t+1] is a completion token
    sampler_logp: np.ndarray  # [B, L-1] f32: the sampler's log-prob of tokens[:, t+1]
    advantages: np.ndarray  # [B] f32


def build_experience(prompt_ids: Sequence[Sequence[int]], out: rollout.Rollout, advantages: np.ndarray,
                     pad_id: int, bucket: int = 32, width: int | None = None) -> Experience:
    """Lays each (prompt, completion) pair out from position 0; pads the length up to a multiple of
    `bucket` so that few shapes are compiled (or to `width`, which every host of a pod must share)."""
    lengths = np.asarray(out.lengths)
    if width is None:
        width = experience_width(prompt_ids, lengths, bucket)
    b = len(prompt_ids)
    tokens = np.full((b, width), pad_id, np.int32)
    loss_mask = np.zeros((b, width - 1), np.float32)
    sampler_logp = np.zeros((b, width - 1), np.float32)
    gen_tokens, gen_logp = np.asarray(out.tokens), np.asarray(out.logprobs)
    for i, (p, n) in enumerate(zip(prompt_ids, lengths)):
        n = int(n)
        if len(p) + n > width:
            raise ValueError(f"sequence {i} has {len(p) + n} tokens, more than the width {width}")
        tokens[i, :len(p)] = p
        tokens[i, len(p):len(p) + n] = gen_tokens[i, :n]
        loss_mask[i, len(p) - 1:len(p) - 1 + n] = 1.0  # position t predicts token t+1
        sampler_logp[i, len(p) - 1:len(p) - 1 + n] = gen_logp[i, :n]
    return Experience(tokens, loss_mask, sampler_logp, np.asarray(advantages, np.float32))


def experience_width(prompt_ids: Sequence[Sequence[int]], lengths: Sequence[int], bucket: int = 32) -> int:
    """The smallest multiple of `bucket` that holds every prompt + completion (at least `bucket`)."""
    total = max((len(p) + int(n) for p, n in zip(prompt_ids, lengths)), default=1)
    return -(-total // bucket) * bucket


def completion_texts(tokenizer: hf.Tokenizer, out: rollout.Rollout) -> list[str]:
    """Decoded completions without their stop token (so 'Answer: 42<eos>' reads as 'Answer: 42')."""
    return [tokenizer.decode(t[:int(n) - int(f)]) for t, n, f in zip(out.tokens, out.lengths, out.finished)]


class Learner:
    """Holds the model, the PEFT method, the jitted rollout/update functions and the run state."""

    def __init__(self, c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
        self.c = c
        self.mesh = mesh or mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        base_model, params = hf.load(c.model.checkpoint, dtype=jnp.dtype(c.model.param_dtype), mesh=self.mesh,
                                     compute_dtype=jnp.dtype(c.model.dtype))
        self.method = memory.peft_method(c).prepare(params)
        self.cfg = base_model.cfg.replace(remat=c.model.remat)
        self.tokenizer = hf.Tokenizer(c.model.checkpoint)
        self.model = tfm.Transformer(self.cfg, peft=self.method)
        key = jax.random.fold_in(jax.random.key(c.seed), _ADAPTER)
        self.params, adapter = peft.init_adapter(self.method, key, params)
        self.params = tfm.shard_params(self.params, self.cfg, self.mesh)
        replicated = mesh_lib.replicated(self.mesh)
        self.adapter = jax.device_put(adapter, replicated)
        # The reference policy: adapter off, or the initial adapter for residual methods (PiSSA, MiLoRA).
        self.ref_adapter = self.adapter if self.method.residual else None
        self.tx = optim.make_optimizer(
            self.method, adapter, self._schedule(), weight_decay=c.optim.weight_decay, b1=c.optim.b1,
            b2=c.optim.b2, eps=c.optim.eps, loraplus_ratio=c.optim.loraplus_ratio,
            grad_clip=c.optim.grad_clip or None)
        self.opt_state = jax.device_put(self.tx.init(self.adapter), replicated)
        self.method_state = self.method.init_state(self.adapter)
        self.step = 0
        rl = c.rl
        stop = [t for t in {self.tokenizer.eos_id, self.cfg.eos_token_id} if t is not None]
        sampling = rollout.SamplingConfig(rl.max_new_tokens, rl.temperature, rl.top_p, rl.top_k)
        self.sampler = rollout.Sampler(self.model, sampling, pad_id=self.tokenizer.pad_id, stop_tokens=stop,
                                       mesh=self.mesh)
        self.template = prompt_lib.get_template(c.data.template)
        self.rewards = reward_lib.MathRewardPool(workers=c.get("reward_workers", 2))
        self._grad = jax.jit(self._grad_fn, static_argnames=("with_old",))
        self._apply = jax.jit(self._apply_fn, donate_argnums=(0, 1))

    # ------------------------------------------------------------------ pieces of a step
    def _schedule(self) -> optax.Schedule:
        o = self.c.optim
        if o.schedule == "constant":
            sched = optax.constant_schedule(o.learning_rate)
        elif o.schedule == "cosine":
            sched = optax.cosine_decay_schedule(o.learning_rate, max(1, self.c.steps - o.warmup_steps))
        else:
            raise ValueError(f"config optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}")
        if o.warmup_steps:
            sched = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), sched],
                                         [o.warmup_steps])
        return sched

    def prompt_ids(self, problems: Sequence[str]) -> tuple[list[list[int]], int]:
        """Chat-formatted prompt tokens, left-truncated to max_prompt_tokens; and how many were cut."""
        limit = self.c.rl.max_prompt_tokens
        ids, cut = [], 0
        for p in problems:
            t = self.tokenizer.apply_chat_template(self.template.messages(p), add_generation_prompt=True,
                                                   tokenize=True)
            cut += len(t) > limit
            ids.append(t[-limit:])
        return ids, cut

    def sample(self, adapter: Any, prompt_ids: list[list[int]], key: Array) -> rollout.Rollout:
        """Completions of this host's prompts (every host passes the same number), as numpy."""
        longest = int(mesh_lib.gather_hosts(max(len(p) for p in prompt_ids)).max())
        width = -(-longest // 16) * 16  # a few padded widths, so a few compilations
        tokens, mask = rollout.left_pad(prompt_ids, self.tokenizer.pad_id, length=width)
        out = self.sampler({"params": self.params, "adapter": adapter}, tokens, mask, key)
        return rollout.Rollout(*(mesh_lib.local_rows(x, self.mesh) for x in out))

    def _grad_fn(self, adapter, params, ref_adapter, tokens, loss_mask, sampler_logp, advantages, old_logp,
                 total_tokens, total_seqs, share, with_old: bool):
        rl = self.c.rl

        def loss_fn(adapter):
            lp, ent = tfm.token_logprobs(self.model, {"params": params, "adapter": adapter}, tokens,
                                         with_entropy=True, temperature=rl.temperature)
            old = old_logp if with_old else jax.lax.stop_gradient(lp)
            ref = None
            if rl.kl_coef > 0:
                ref_vars = {"params": params} if ref_adapter is None else {"params": params, "adapter": ref_adapter}
                ref, _ = tfm.token_logprobs(self.model, ref_vars, tokens, temperature=rl.temperature)
                ref = jax.lax.stop_gradient(ref)
            loss, m = losses.policy_loss(
                lp, old, advantages, loss_mask, eps_low=rl.epsilon_low, eps_high=rl.epsilon_high,
                aggregation=rl.loss, max_len=rl.max_new_tokens, ref_logp=ref, kl_coef=rl.kl_coef,
                kl_estimator=rl.kl_estimator, sampler_logp=sampler_logp, tis_cap=rl.tis_cap,
                total_tokens=total_tokens, total_seqs=total_seqs)
            loss = loss + share * self.method.regularizer(adapter)
            n = jnp.maximum(loss_mask.sum(), 1.0)
            m = {k: v * loss_mask.sum() for k, v in m.items()}  # token-weighted sums, normalised later
            m["entropy"] = (ent * loss_mask).sum()
            m["tokens"] = n
            return loss, m

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter)
        return loss, m, grads

    def _apply_fn(self, adapter, opt_state, grads):
        norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, norm

    def update(self, exp: Experience) -> dict[str, float]:
        """One or more optimizer updates over the experience, in micro-batches (gradient accumulation).

        `exp` holds this host's sequences (any number, possibly none; the same width on every host);
        the gradient is over the global batch of all hosts."""
        rl = self.c.rl
        counts = mesh_lib.gather_hosts(exp.tokens.shape[0])
        rows = int(counts.max())
        micro = max(1, min(rl.micro_batch_size // jax.process_count(), rows))
        pad = -(-rows // micro) * micro - exp.tokens.shape[0]
        arrays = [exp.tokens, exp.loss_mask, exp.sampler_logp, exp.advantages]
        arrays = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in arrays]
        n_rows = arrays[0].shape[0]
        total_tokens = jnp.float32(mesh_lib.gather_hosts(exp.loss_mask.sum()).sum())
        total_seqs = jnp.float32(counts.sum())
        put = functools.partial(mesh_lib.host_batch, mesh=self.mesh)
        old_logp = None
        if rl.updates_per_batch > 1:
            old_logp = np.concatenate([
                mesh_lib.local_rows(self._logp(self.adapter, self.params, put(arrays[0][i:i + micro])), self.mesh)
                for i in range(0, n_rows, micro)])
        out: dict[str, float] = {}
        for _ in range(rl.updates_per_batch):
            grads, sums, loss = None, {}, 0.0
            for i in range(0, n_rows, micro):
                sl = slice(i, i + micro)
                old = put(old_logp[sl]) if old_logp is not None else put(arrays[2][sl])
                l, m, g = self._grad(self.adapter, self.params, self.ref_adapter, put(arrays[0][sl]),
                                     put(arrays[1][sl]), put(arrays[2][sl]), put(arrays[3][sl]), old,
                                     total_tokens, total_seqs, jnp.float32(micro / n_rows),
                                     with_old=old_logp is not None)
                grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
                loss += float(l)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            self.adapter, self.opt_state, gnorm = self._apply(self.adapter, self.opt_state, grads)
            gnorm = float(gnorm)
            if not (np.isfinite(loss) and np.isfinite(gnorm)):
                raise TrainingDiverged(f"step {self.step + 1}: loss={loss} grad_norm={gnorm}")
            self.adapter, self.method_state = self.method.on_step(jnp.int32(self.step), grads, self.adapter,
                                                                  self.method_state)
            n = max(sums.pop("tokens"), 1.0)
            out = {"loss": loss, "grad_norm": gnorm, **{k: v / n for k, v in sums.items()}}
        return out

    def train_step(self, problems: Sequence[str], golds: Sequence[str], key: Array) -> dict[str, float]:
        """One RL step on this host's prompts (`problems`, each already repeated group_size times in a
        row): sample, grade, advantages, filter, update. Returns the step's metrics over all hosts."""
        rl = self.c.rl
        t0 = time.perf_counter()
        ids, truncated_prompts = self.prompt_ids(problems)
        out = self.sample(self.adapter, ids, key)
        t1 = time.perf_counter()
        texts = completion_texts(self.tokenizer, out)
        correct = np.asarray(self.rewards(texts, golds), np.float32)
        rewards = correct + np.asarray(losses.overlong_penalty(
            out.lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty))
        adv = np.asarray(losses.group_advantages(jnp.asarray(rewards), rl.group_size, scale=rl.scale_rewards))
        keep = (np.asarray(losses.informative_groups(jnp.asarray(rewards), rl.group_size))
                if rl.dynamic_sampling else np.ones(len(rewards), bool))
        t2 = time.perf_counter()
        m: dict[str, float] = {}
        kept = np.flatnonzero(keep)
        if mesh_lib.gather_hosts(len(kept)).sum():
            kept_ids = [ids[i] for i in kept]
            width = int(mesh_lib.gather_hosts(experience_width(kept_ids, out.lengths[kept])).max())
            exp = build_experience(kept_ids, jax.tree.map(lambda x: x[kept], out), adv[kept],
                                   self.tokenizer.pad_id, width=width)
            m = self.update(exp)
        t3 = time.perf_counter()
        lengths = mesh_lib.gather_hosts(out.lengths)
        m.update({
            "reward": float(mesh_lib.gather_hosts(rewards).mean()),
            "accuracy": float(mesh_lib.gather_hosts(correct).mean()),
            "response_length": float(lengths.mean()),
            "truncation_rate": float(np.mean(~mesh_lib.gather_hosts(out.finished))),
            "kept_fraction": float(mesh_lib.gather_hosts(keep).mean()),
            "truncated_prompts": int(mesh_lib.gather_hosts(truncated_prompts).sum()),
            "learning_rate": float(self._schedule()(self.step)),
            "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2,
            "tokens_per_s": float(lengths.sum()) / (t3 - t0),
        })
        self.step += 1
        return m

    @functools.cached_property
    def _logp(self):
        return jax.jit(lambda adapter, params, tokens: tfm.token_logprobs(
            self.model, {"params": params, "adapter": adapter}, tokens, temperature=self.c.rl.temperature)[0])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, records: Sequence[dict[str, str]], samples: int, key: Array) -> float:
        """Mean reward of `samples` completions per held-out problem (same key -> same problems, draws).
        Each host grades its share of the rows."""
        ids, _ = self.prompt_ids([r["problem"] for r in records])
        ids = [p for p in ids for _ in range(samples)]
        golds = [r["answer"] for r in records for _ in range(samples)]
        hosts, me = jax.process_count(), jax.process_index()
        bs = max(1, self.c.eval.batch_size // hosts)
        per_host = -(-len(ids) // (hosts * bs)) * bs  # whole batches of bs rows on every host
        mine = list(range(me * per_host, min(len(ids), (me + 1) * per_host)))
        rows = mine + [0] * (per_host - len(mine))  # filler rows (not counted) keep the batch shape
        correct = 0.0
        for i in range(0, per_host, bs):
            batch = rows[i:i + bs]
            out = self.sample(self.adapter, [ids[r] for r in batch], jax.random.fold_in(key, i))
            counted = min(len(batch), max(0, len(mine) - i))
            texts = completion_texts(self.tokenizer, out)[:counted]
            correct += float(np.sum(self.rewards(texts, [golds[r] for r in batch[:counted]])))
        return float(mesh_lib.gather_hosts(correct).sum()) / len(ids)

    def close(self) -> None:
        self.rewards.close()


def train_records(c: ml_collections.ConfigDict) -> Sequence[dict[str, str]]:
    d = c.data
    if d.train == "synthetic":
        return synthetic.SyntheticSource(d.synthetic_size, seed=d.synthetic_seed, kinds=tuple(d.synthetic_kinds),
                                         levels=tuple(d.synthetic_levels))
    return loaders.load_math_dataset(d.train, d.problem_field, d.answer_field)


def heldout_records(c: ml_collections.ConfigDict) -> list[dict[str, str]]:
    e, d = c.eval, c.data
    if e.heldout == "synthetic":
        src = synthetic.SyntheticSource(e.num_problems, seed=d.synthetic_seed + 1_000_003,
                                        kinds=tuple(d.synthetic_kinds), levels=tuple(d.synthetic_levels))
        return [src[i] for i in range(len(src))]
    return loaders.load_benchmark(e.heldout)[:e.num_problems]


def train(c: ml_collections.ConfigDict, workdir: str | None) -> dict[str, float]:
    """Runs (or resumes, if `workdir` holds a checkpoint) the experiment `c`."""
    workdir = Path(workdir or f"runs/{c.peft.name}")
    ckpt_lib.save_config(workdir, c)
    learner = Learner(c)
    rl = c.rl
    seed_key = jax.random.key(c.seed)
    for name in ("prompts_per_step", "micro_batch_size"):
        if rl[name] % jax.process_count():
            raise ValueError(f"config rl.{name}={rl[name]} must divide evenly over {jax.process_count()} hosts")
    per_host = rl.prompts_per_step // jax.process_count()  # each host reads its own shard
    dataset = pipeline.math_dataset(train_records(c), per_host, seed=c.seed, shuffle=c.data.shuffle)
    checkpointer = ckpt_lib.Checkpointer(workdir)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
    heldout = heldout_records(c)
    eval_key = jax.random.fold_in(seed_key, _EVAL)
    state = {"adapter": learner.adapter, "opt": learner.opt_state, "method": learner.method_state}
    data_state = None
    latest = checkpointer.latest_step()
    if latest is not None:
        restored, data_state, meta = checkpointer.restore(latest, state)
        learner.adapter, learner.opt_state, learner.method_state = (
            restored["adapter"], restored["opt"], restored["method"])
        learner.step = latest
        before = meta["heldout_before"]
        writer.truncate_after(latest)
        print(f"resumed from {checkpointer.dir} at step {latest}", flush=True)
    else:
        before = learner.evaluate(heldout, c.eval.samples, eval_key)
        print(f"heldout_accuracy at start: {before:.3f} ({len(heldout)} problems x {c.eval.samples})", flush=True)
    it = pipeline.make_iterator(dataset, data_state)
    progress = metrics_lib.Progress(c.steps, ("reward", "accuracy", "response_length", "loss", "entropy",
                                              "tokens_per_s"))
    t_start = time.perf_counter()
    try:
        while learner.step < c.steps:
            step = learner.step + 1
            batch = next(it)
            problems = [p for p in batch["problem"] for _ in range(rl.group_size)]
            golds = [a for a in batch["answer"] for _ in range(rl.group_size)]
            m = learner.train_step(problems, golds, jax.random.fold_in(jax.random.fold_in(seed_key, _ROLLOUT), step))
            if c.eval_every and step % c.eval_every == 0 and step != c.steps:
                m["heldout_accuracy"] = learner.evaluate(heldout, c.eval.samples, eval_key)
            writer.write(step, m)
            if step % c.log_every == 0 and jax.process_index() == 0:
                progress(step, m)
            if step % c.checkpoint_every == 0 or step == c.steps:
                checkpointer.save(step, {"adapter": learner.adapter, "opt": learner.opt_state,
                                         "method": learner.method_state}, it.get_state(),
                                  {"heldout_before": before})
        after = learner.evaluate(heldout, c.eval.samples, eval_key)
    finally:
        writer.close()
        checkpointer.close()
        learner.close()
    print(f"trained {c.steps} steps in {time.perf_counter() - t_start:.0f} s; workdir {workdir}", flush=True)
    print(f"heldout_accuracy before={before:.3f} after={after:.3f}", flush=True)
    return {"heldout_before": before, "heldout_after": after}
