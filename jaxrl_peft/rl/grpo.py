"""The GRPO task: batches are sampled and graded (prompts -> G completions -> rewards -> advantages ->
filter), the loss is the clipped policy loss (GRPO / DAPO / Dr. GRPO aggregation, KL, truncated IS).

Everything else (optimizer, micro-batches, checkpoints, metrics, resume) is the training core's:
`jaxrl_peft.train.loop.train(GRPOTask(config), config, workdir)`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrl_peft.data import loaders, pipeline, prompts as prompt_lib, synthetic
from jaxrl_peft.eval import math_eval
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import family, hub
from jaxrl_peft.peft import registry
from jaxrl_peft.rewards import math as reward_lib
from jaxrl_peft.rl import losses, rollout
from jaxrl_peft.train import loop

Array = jax.Array


@dataclasses.dataclass
class Experience:
    """Training sequences of one step: prompt + completion, left-aligned, right-padded."""

    tokens: np.ndarray  # [B, L] int32
    loss_mask: np.ndarray  # [B, L-1] f32: 1 where tokens[:, t+1] is a completion token
    sampler_logp: np.ndarray  # [B, L-1] f32: the sampler's log-prob of tokens[:, t+1]
    advantages: np.ndarray  # [B] f32

    def rows(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


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


@dataclasses.dataclass
class Sampled:
    """Completions of this host's prompts (groups contiguous) and their grades."""

    ids: list[list[int]]  # prompt tokens per row
    out: rollout.Rollout  # numpy
    correct: np.ndarray  # [B] 1.0 where the answer is right
    rewards: np.ndarray  # [B] correct + overlong penalty
    informative: np.ndarray  # [B] True for every row of a group whose rewards are not all equal
    truncated_prompts: int
    time_rollout: float
    time_reward: float

    @staticmethod
    def concatenate(parts: Sequence["Sampled"]) -> "Sampled":
        if len(parts) == 1:
            return parts[0]
        width = max(p.out.tokens.shape[1] for p in parts)
        pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
        out = rollout.Rollout(*(np.concatenate([pad(np.asarray(getattr(p.out, f))) if np.ndim(getattr(p.out, f)) == 2
                                                else np.asarray(getattr(p.out, f)) for p in parts])
                                for f in rollout.Rollout._fields))
        return Sampled(sum((p.ids for p in parts), []), out, *(np.concatenate([getattr(p, f) for p in parts])
                                                               for f in ("correct", "rewards", "informative")),
                       sum(p.truncated_prompts for p in parts), sum(p.time_rollout for p in parts),
                       sum(p.time_reward for p in parts))


def check_config(c: ml_collections.ConfigDict) -> None:
    """Refuses settings that cannot train, naming the flag (before any weight is loaded)."""
    rl = c.rl
    if rl.group_size < 2:
        raise loop.ConfigError(f"config rl.group_size={rl.group_size}: GRPO needs at least 2 completions per prompt "
                         "(the advantage is the reward minus the group mean, always 0 for one completion)")
    for name in ("prompts_per_step", "micro_batch_size"):
        if rl[name] < 1 or rl[name] % jax.process_count():
            raise loop.ConfigError(f"config rl.{name}={rl[name]} must be >= 1 and divide evenly over "
                             f"{jax.process_count()} hosts")
    choices = {"loss": ("grpo", "dapo", "dr_grpo"), "objective": ("clip", "cispo"),
               "importance_sampling_level": ("token", "sequence"), "kl_estimator": ("k1", "k3", "k3_corrected"),
               "tis_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
               "scale_rewards": ("group", "batch", "none", True, False)}
    for name, allowed in choices.items():
        if rl[name] not in allowed:
            raise loop.ConfigError(f"config rl.{name}={rl[name]!r}: expected one of {list(allowed)}")
    if rl.max_sampling_rounds < 0:
        raise loop.ConfigError(f"config rl.max_sampling_rounds={rl.max_sampling_rounds} must be >= 0")
    if rl.updates_per_batch < 1 or rl.max_new_tokens < 1 or rl.max_prompt_tokens < 1:
        raise loop.ConfigError("config rl.updates_per_batch, rl.max_new_tokens and rl.max_prompt_tokens must be >= 1")
    if c.eval.samples < 1 or c.eval.batch_size < 1:
        raise loop.ConfigError("config eval.samples and eval.batch_size must be >= 1")


def train_records(c: ml_collections.ConfigDict) -> Sequence[dict[str, str]]:
    """config.data.train: 'synthetic', a local data file, or a hub dataset id (`org/name[:config]`)."""
    d = c.data
    if d.train == "synthetic":
        return synthetic.SyntheticSource(d.synthetic_size, seed=d.synthetic_seed, kinds=tuple(d.synthetic_kinds),
                                         levels=tuple(d.synthetic_levels))
    resolved = hub.resolve_dataset(d.train, d.get("revision") or None)
    return [r for f in resolved.files for r in loaders.load_math_dataset(f, d.problem_field, d.answer_field)]


def heldout_records(c: ml_collections.ConfigDict) -> list[dict[str, str]]:
    e, d = c.eval, c.data
    if e.heldout == "synthetic":
        src = synthetic.SyntheticSource(e.num_problems, seed=d.synthetic_seed + 1_000_003,
                                        kinds=tuple(d.synthetic_kinds), levels=tuple(d.synthetic_levels))
        return [src[i] for i in range(len(src))]
    return loaders.load_benchmark(e.heldout)[:e.num_problems]


class GRPOTask:
    """GRPO / DAPO / Dr. GRPO on a model of either family (the R1-Distill decoder, RWKV-7) with any PEFT
    method (configs/base_grpo.py, configs/grpo_rwkv7.py)."""

    name = "grpo"
    eval_metric = "heldout_accuracy"
    progress_keys = ("reward", "accuracy", "response_length", "loss", "entropy", "tokens_per_s")

    def __init__(self, c: ml_collections.ConfigDict, records: Sequence[dict[str, str]] | None = None,
                 scorer: math_eval.Scorer | None = None):
        """`records` replace the config's training data; `scorer(completions, golds) -> rewards` replaces
        the math reward (tests)."""
        check_config(c)
        self._scorer = scorer
        self.c = c
        self.micro_batch_size = c.rl.micro_batch_size
        self.updates_per_batch = c.rl.updates_per_batch
        self.data_files = {"train": c.data.train}
        self._records = records
        self.seed_key = jax.random.key(c.seed)

    # ------------------------------------------------------------------ built once
    def setup(self, mesh: jax.sharding.Mesh) -> loop.Setup:
        c = self.c
        self.mesh = mesh
        path = hub.resolve_model(c.model.checkpoint, c.model.get("revision") or None).path
        self.data_files["model"] = str(path)
        base_family, params = family.load(path, dtype=c.model.param_dtype, compute_dtype=c.model.dtype, mesh=mesh)
        method = registry.from_config(c.peft).prepare(params)
        self.method = method
        self.family = base_family.with_peft(method, remat=c.model.remat)
        self.cfg = self.family.config
        self.tokenizer = self.family.tokenizer()
        self.model = self.family.module
        rl = c.rl
        stop = self.family.stop_ids(self.tokenizer)
        self.sampler = rollout.Sampler(self.family, rollout.SamplingConfig(rl.max_new_tokens, rl.temperature,
                                                                          rl.top_p, rl.top_k),
                                       pad_id=self.tokenizer.pad_id, stop_tokens=stop, mesh=mesh)
        self.rewards = self._scorer or reward_lib.MathRewardPool(workers=c.get("reward_workers", 2))
        per_host = rl.prompts_per_step // jax.process_count()  # each host reads its own shard
        records = self._records if self._records is not None else train_records(c)
        self.dataset = pipeline.math_dataset(records, per_host, seed=c.seed, shuffle=c.data.shuffle)
        self.iterator = pipeline.make_iterator(self.dataset)
        self.heldout = heldout_records(c)
        # The KL reference policy: the adapter off (full fine-tuning keeps its base weights for it), or
        # for residual methods (PiSSA, MiLoRA), whose base is rewritten, the initial adapter.
        kl = rl.kl_coef > 0
        return loop.Setup(params, self.family.param_axes(), method, keep_base=kl, keep_initial_adapter=kl and method.residual)

    def variables(self, frozen: Any, adapter: Any) -> dict:
        return self.method.model_variables(frozen["base"], adapter)

    def reference_variables(self, frozen: Any) -> dict:
        if "initial_adapter" in frozen:
            return self.variables(frozen, frozen["initial_adapter"])
        return {"params": frozen["base"]}

    # ------------------------------------------------------------------ batches
    def data_state(self) -> Any:
        return self.iterator.get_state()

    def restore_data_state(self, state: Any) -> None:
        self.iterator = pipeline.make_iterator(self.dataset, state)

    def next_batch(self, step: int, frozen: Any, adapter: Any
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """The step's training rows. With dynamic sampling, groups whose rewards are all equal carry no
        signal and are dropped, and more prompts are sampled until every host holds its share of
        informative groups (the step's full batch) or `rl.max_sampling_rounds` extra rounds are spent."""
        rl = self.c.rl
        key = jax.random.fold_in(jax.random.fold_in(self.seed_key, loop.ROLLOUT), step)
        rounds: list[Sampled] = []
        need = rl.prompts_per_step // jax.process_count()
        while True:
            batch = next(self.iterator)
            problems = [p for p in batch["problem"] for _ in range(rl.group_size)]
            golds = [a for a in batch["answer"] for _ in range(rl.group_size)]
            round_key = key if not rounds else jax.random.fold_in(key, len(rounds))
            rounds.append(self.sample_and_grade(frozen, adapter, problems, golds, round_key))
            if not rl.dynamic_sampling:
                break
            have = sum(int(r.informative.sum()) for r in rounds) // rl.group_size
            short = int(mesh_lib.gather_hosts(max(need - have, 0)).sum())  # groups missing, over all hosts
            if short == 0 or len(rounds) > rl.max_sampling_rounds:
                break
        sampled = Sampled.concatenate(rounds)
        keep = sampled.informative if rl.dynamic_sampling else np.ones(len(sampled.rewards), bool)
        keep = keep & (np.cumsum(keep) <= need * rl.group_size)  # this host's first `need` kept groups
        rows, totals, metrics = self.rows(sampled, keep)
        if rl.dynamic_sampling:
            trained = int(mesh_lib.gather_hosts(keep.sum()).sum()) // rl.group_size
            metrics.update({
                "sampling_rounds": len(rounds) - 1,
                "groups_sampled": int(mesh_lib.gather_hosts(len(sampled.rewards)).sum()) // rl.group_size,
                "groups_informative": int(mesh_lib.gather_hosts(sampled.informative.sum()).sum()) // rl.group_size,
                "groups_trained": trained, "full_batch": int(trained == rl.prompts_per_step)})
            if trained < rl.prompts_per_step and jax.process_index() == 0:
                print(f"step {step}: dynamic sampling reached its cap of {rl.max_sampling_rounds} extra rounds "
                      f"with {trained} of {rl.prompts_per_step} informative groups; training on those", flush=True)
        return rows, totals, metrics

    def experience(self, frozen: Any, adapter: Any, problems: Sequence[str], golds: Sequence[str], key: Array
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """This host's prompts (each already repeated group_size times in a row) -> sampled, graded
        training rows, the global normalisers and the step's metrics over all hosts (one round, no refill)."""
        sampled = self.sample_and_grade(frozen, adapter, problems, golds, key)
        keep = sampled.informative if self.c.rl.dynamic_sampling else np.ones(len(sampled.rewards), bool)
        return self.rows(sampled, keep)

    def sample_and_grade(self, frozen: Any, adapter: Any, problems: Sequence[str], golds: Sequence[str],
                         key: Array) -> Sampled:
        rl = self.c.rl
        t0 = time.perf_counter()
        ids, truncated_prompts = prompt_lib.prompt_ids(problems, self.tokenizer, self.c.data.template,
                                                       rl.max_prompt_tokens)
        out = self.sample(frozen, adapter, ids, key)
        t1 = time.perf_counter()
        correct = np.asarray(self.rewards(rollout.decode_completions(self.tokenizer, out), golds), np.float32)
        rewards = correct + np.asarray(losses.overlong_penalty(
            out.lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty))
        informative = np.asarray(losses.informative_groups(jnp.asarray(rewards), rl.group_size))
        return Sampled(ids, out, correct, rewards, informative, truncated_prompts, t1 - t0,
                       time.perf_counter() - t1)

    def rows(self, sampled: Sampled, keep: np.ndarray
             ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """Advantages and training rows of the kept groups; metrics over every sampled completion."""
        rl = self.c.rl
        out = sampled.out
        kept = np.flatnonzero(keep)
        rows, totals = {}, {}
        counts = mesh_lib.gather_hosts(len(kept))
        if counts.sum():
            every = mesh_lib.gather_hosts(sampled.rewards[kept])  # 'batch' scaling takes the global std
            offset = int(counts[:jax.process_index()].sum())
            adv = np.asarray(losses.group_advantages(jnp.asarray(every), rl.group_size, scale=rl.scale_rewards)
                             )[offset:offset + len(kept)]
            kept_ids = [sampled.ids[i] for i in kept]
            width = int(mesh_lib.gather_hosts(experience_width(kept_ids, out.lengths[kept])).max())
            exp = build_experience(kept_ids, jax.tree.map(lambda x: x[kept], out), adv, self.tokenizer.pad_id,
                                   width=width)
            if rl.mask_truncated_completions:  # completions cut at the budget teach nothing about their end
                exp.loss_mask[~out.finished[kept]] = 0.0
            rows = exp.rows()
            totals = {"tokens": float(mesh_lib.gather_hosts(exp.loss_mask.sum()).sum()),
                      "sequences": float(counts.sum())}
        lengths = mesh_lib.gather_hosts(out.lengths)
        seconds = sampled.time_rollout + sampled.time_reward
        metrics = {
            "reward": float(mesh_lib.gather_hosts(sampled.rewards).mean()),
            "accuracy": float(mesh_lib.gather_hosts(sampled.correct).mean()),
            "response_length": float(lengths.mean()),
            "truncation_rate": float(np.mean(~mesh_lib.gather_hosts(out.finished))),
            "kept_fraction": float(mesh_lib.gather_hosts(keep).mean()),
            "truncated_prompts": int(mesh_lib.gather_hosts(sampled.truncated_prompts).sum()),
            "time_rollout": sampled.time_rollout, "time_reward": sampled.time_reward,
            "tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9),
        }
        return rows, totals, metrics

    def sample(self, frozen: Any, adapter: Any, prompt_ids: list[list[int]], key: Array) -> rollout.Rollout:
        """Completions of this host's prompts (every host passes the same number), as numpy."""
        longest = int(mesh_lib.gather_hosts(max(len(p) for p in prompt_ids)).max())
        width = -(-longest // 16) * 16  # a few padded widths, so a few compilations
        tokens, mask = rollout.left_pad(prompt_ids, self.tokenizer.pad_id, length=width)
        out = self.sampler(self.variables(frozen, adapter), tokens, mask, key)
        return rollout.Rollout(*(mesh_lib.local_rows(x, self.mesh) for x in out))

    # ------------------------------------------------------------------ the loss
    def _logprobs(self, variables: dict, tokens: Array, with_entropy: bool = False):
        return self.family.token_logprobs(variables, tokens, with_entropy=with_entropy,
                                          temperature=self.c.rl.temperature)

    def pre_update(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> dict[str, Array]:
        """With several updates per batch, the log-probs before the first update are the 'old' policy."""
        if self.updates_per_batch == 1:
            return {}
        return {"old_logp": self._logprobs(self.variables(frozen, adapter), batch["tokens"])[0]}

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, Array], totals: dict[str, Array]
             ) -> tuple[Array, dict[str, Array]]:
        """The clipped policy loss of one micro-batch, normalised by the whole batch's totals."""
        rl = self.c.rl
        mask = batch["loss_mask"]
        lp, ent = self._logprobs(self.variables(frozen, adapter), batch["tokens"], with_entropy=True)
        old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(lp)
        ref = None
        if rl.kl_coef > 0:
            ref = jax.lax.stop_gradient(self._logprobs(self.reference_variables(frozen), batch["tokens"])[0])
        loss, m = losses.policy_loss(
            lp, old, batch["advantages"], mask, eps_low=rl.epsilon_low, eps_high=rl.epsilon_high,
            aggregation=rl.loss, max_len=rl.max_new_tokens, ref_logp=ref, kl_coef=rl.kl_coef,
            kl_estimator=rl.kl_estimator, sampler_logp=batch["sampler_logp"], tis_cap=rl.tis_cap,
            total_tokens=totals["tokens"], total_seqs=totals["sequences"], objective=rl.objective,
            cispo_cap=rl.cispo_cap, importance_sampling_level=rl.importance_sampling_level,
            delta=rl.delta or None, tis_mode=rl.tis_mode, tis_floor=rl.tis_floor or None)
        tokens = mask.sum()
        sums = {k: v * tokens for k, v in m.items()}  # token-weighted sums; the core divides by 'weight'
        sums["entropy"] = (ent * mask).sum()
        sums["weight"] = tokens
        return loss, sums

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, frozen: Any, adapter: Any) -> float:
        return self.evaluate_records(frozen, adapter, self.heldout, self.c.eval.samples, self.c.seed)

    def evaluate_records(self, frozen: Any, adapter: Any, records: Sequence[dict[str, str]], samples: int,
                         seed: int) -> float:
        """Mean reward of `samples` completions per problem, through the one held-out evaluator (the same
        seed gives the same draws; every host samples and grades its share)."""
        results = math_eval.evaluate_with(
            self.sampler, self.variables(frozen, adapter), self.tokenizer, {"heldout": records},
            {"heldout": samples}, self.c.eval.batch_size, template=self.c.data.template,
            max_prompt_tokens=self.c.rl.max_prompt_tokens, prompt_bucket=16, seed=seed, scorer=self.rewards,
            log=None)
        return float(results.summary()["heldout"]["avg_at_k"])

    def close(self) -> None:
        if self._scorer is None:
            self.rewards.close()
