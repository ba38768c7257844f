"""avg@k / pass@k evaluation of a policy on math benchmarks with the jitted sampler.

Each problem is rendered with the chat template and a named prompt template, sampled k times and
scored with the math reward. Rows are sorted by prompt length and batched per benchmark; each batch is
left-padded to a multiple of `prompt_bucket` and filled up to `batch_size`, so the sampler compiles
once per prompt bucket. Row r of problem p uses the RNG stream fold_in(key(seed, benchmark), p * k + r):
results do not depend on the batch size or on which other benchmarks run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxrl_peft.data import loaders, prompts as prompt_lib, synthetic
from jaxrl_peft.eval import metrics
from jaxrl_peft.infra import mesh as mesh_lib
from jaxrl_peft.models import hf, hub, transformer as tfm
from jaxrl_peft.models import hf_peft
from jaxrl_peft.rewards import math as reward_lib
from jaxrl_peft.rl import rollout

SYNTHETIC = "synthetic"
Scorer = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclasses.dataclass
class ProblemResult:
    """One problem's k samples: extracted answers, correctness, lengths (stop token included)."""

    index: int
    problem: str
    gold: str
    answers: list[str | None]
    correct: list[bool]
    lengths: list[int]
    finished: list[bool]
    completions: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.completions is None:
            del out["completions"]
        return out


@dataclasses.dataclass
class BenchmarkResult:
    """All problems of one benchmark and their aggregate metrics."""

    name: str
    k: int
    problems: list[ProblemResult]
    truncated_prompts: int = 0

    def summary(self) -> dict[str, Any]:
        """n_problems, k, avg_at_k, pass_at_k, pass@j for j in report_ks(k), mean_length, truncation_rate."""
        curve = metrics.benchmark_metrics([p.correct for p in self.problems])
        lengths = np.concatenate([p.lengths for p in self.problems])
        finished = np.concatenate([p.finished for p in self.problems])
        return {
            "n_problems": len(self.problems), "k": self.k,
            "avg_at_k": curve[f"avg@{self.k}"], "pass_at_k": curve[f"pass@{self.k}"],
            "mean_length": float(lengths.mean()), "truncation_rate": float(np.mean(~finished)),
            "truncated_prompts": self.truncated_prompts,
            **{key: v for key, v in curve.items() if key.startswith("pass@")},
        }


MEAN_KEYS = ("avg_at_k", "pass_at_k", "mean_length", "truncation_rate")


@dataclasses.dataclass
class EvalResults:
    """Per-benchmark results, the unweighted mean over benchmarks, and generation throughput."""

    benchmarks: dict[str, BenchmarkResult]
    seconds: float
    generated_tokens: int

    def summary(self) -> dict[str, dict[str, Any]]:
        """{benchmark: summary, 'mean': unweighted mean of MEAN_KEYS over benchmarks}."""
        rows = {name: b.summary() for name, b in self.benchmarks.items()}
        mean = metrics.unweighted_mean(rows, MEAN_KEYS)
        mean["n_problems"] = sum(r["n_problems"] for r in rows.values())
        return {**rows, "mean": mean}

    def table(self) -> str:
        """Markdown table: one row per benchmark, then the unweighted mean (accuracies in %)."""
        lines = ["| benchmark | problems | k | avg@k | pass@k | mean length | truncated |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in self.summary().items():
            k = "" if name == "mean" else str(s["k"])
            label = "**mean**" if name == "mean" else name
            lines.append(f"| {label} | {s['n_problems']} | {k} | {100 * s['avg_at_k']:.1f} | "
                         f"{100 * s['pass_at_k']:.1f} | {s['mean_length']:.0f} | {100 * s['truncation_rate']:.1f}% |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "seconds": self.seconds, "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.generated_tokens / max(self.seconds, 1e-9),
            "problems": {name: [p.to_json() for p in b.problems] for name, b in self.benchmarks.items()},
        }


# ---------------------------------------------------------------------------------------------
# loading

def load_benchmarks(names: Sequence[str], limit: int = 0, data_dir: str | os.PathLike | None = None,
                    synthetic_cfg: Mapping[str, Any] | None = None) -> dict[str, list[dict[str, str]]]:
    """Problem records per benchmark: a study benchmark (loaders.BENCHMARKS), 'synthetic' (held-out
    problems from jaxrl_peft.data.synthetic) or a .json/.jsonl/.parquet file. `limit` > 0 keeps the
    first `limit` problems of each."""
    out = {}
    for name in names:
        if name in loaders.BENCHMARKS:
            records = loaders.load_benchmark(name, data_dir)
        elif name == SYNTHETIC:
            s = dict(synthetic_cfg or {})
            n = s.get("num_problems", 64)
            records = [p.as_record() for p in synthetic.generate(
                limit or n, seed=s.get("seed", 1_000_003), kinds=tuple(s.get("kinds", synthetic.KINDS)),
                levels=tuple(s.get("levels", synthetic.LEVELS)))]
        elif Path(name).suffix.lower() in (".json", ".jsonl", ".parquet") and Path(name).is_file():
            records = loaders.load_math_dataset(name, source=Path(name).stem)
        else:
            raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(loaders.BENCHMARKS)}, "
                             f"{SYNTHETIC!r} or an existing .json/.jsonl/.parquet file")
        out[name] = list(records[:limit] if limit > 0 else records)
        if not out[name]:
            raise ValueError(f"benchmark {name!r} has no problems")
    return out


def load_policy(checkpoint: str | os.PathLike, adapter: str | os.PathLike | None = None,
                param_dtype: Any = jnp.bfloat16, dtype: Any = None, mesh: jax.sharding.Mesh | None = None
                ) -> tuple[tfm.Transformer, dict, hf.Tokenizer]:
    """(model, variables, tokenizer) for an HF checkpoint directory (base or merged), optionally with an
    HF PEFT adapter directory on top (variables then hold 'params' and 'adapter')."""
    path = hub.resolve_model(checkpoint).path if hub.is_hub_id(str(checkpoint)) else Path(checkpoint)
    if not path.is_dir():
        raise hf.CheckpointError(f"checkpoint {str(checkpoint)!r} is not a directory; expected an HF checkpoint "
                                 "(config.json, *.safetensors, tokenizer.json)")
    if not (path / "config.json").exists() and (path / "adapter_config.json").exists():
        raise hf.CheckpointError(f"checkpoint {path} is a PEFT adapter; pass it as the adapter and the base "
                                 "model as the checkpoint")
    model, params = hf.load(path, dtype=param_dtype, mesh=mesh, compute_dtype=dtype)
    tokenizer = hf.Tokenizer(path)
    if not adapter:
        return model, {"params": params}, tokenizer
    if not Path(adapter).is_dir():
        raise hf.CheckpointError(f"adapter {str(adapter)!r} is not a directory; expected an HF PEFT adapter "
                                 "(adapter_config.json, adapter_model.safetensors)")
    method, params, adapter_tree = hf_peft.load_adapter(adapter, model.cfg, params)
    adapter_tree = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), adapter_tree)
    if mesh is not None:
        adapter_tree = jax.device_put(adapter_tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return tfm.Transformer(model.cfg, peft=method), {"params": params, "adapter": adapter_tree}, tokenizer


# ---------------------------------------------------------------------------------------------
# evaluation

def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(model: tfm.Transformer, variables: dict, tokenizer: hf.Tokenizer,
             benchmarks: Mapping[str, Sequence[Mapping[str, str]]], k: int | Mapping[str, int],
             sampling: rollout.SamplingConfig, batch_size: int, *, template: str | prompt_lib.PromptTemplate = "dapo",
             max_prompt_tokens: int = 1024, prompt_bucket: int = 128, seed: int = 42,
             mesh: jax.sharding.Mesh | None = None, scorer: Scorer | None = None, reward_workers: int = 2,
             save_completions: bool = False, log: Callable[[str], None] | None = _stderr) -> EvalResults:
    """Samples k completions per problem of each benchmark ({name: [{problem, answer}]}) and scores them.

    `k` is one int or {benchmark: k}; `scorer(completions, golds) -> rewards` defaults to a
    MathRewardPool with `reward_workers` processes; `log` gets progress lines (None: silent).
    """
    if batch_size < 1 or prompt_bucket < 1 or max_prompt_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}), prompt_bucket ({prompt_bucket}) and max_prompt_tokens "
                         f"({max_prompt_tokens}) must be >= 1")
    ks = {name: (k if isinstance(k, int) else k.get(name)) for name in benchmarks}
    for name, kn in ks.items():
        if not isinstance(kn, int) or kn < 1:
            raise ValueError(f"benchmark {name!r}: k must be an int >= 1, got {kn!r}")
    stop = [t for t in dict.fromkeys((tokenizer.eos_id, model.cfg.eos_token_id)) if t is not None]
    sampler = rollout.Sampler(model, sampling, pad_id=tokenizer.pad_id, stop_tokens=stop, mesh=mesh)
    return evaluate_with(sampler, variables, tokenizer, benchmarks, ks, batch_size, template=template,
                         max_prompt_tokens=max_prompt_tokens, prompt_bucket=prompt_bucket, seed=seed,
                         scorer=scorer, reward_workers=reward_workers, save_completions=save_completions,
                         log=log)


def evaluate_with(sampler: rollout.Sampler, variables: dict, tokenizer: hf.Tokenizer,
                  benchmarks: Mapping[str, Sequence[Mapping[str, str]]], ks: Mapping[str, int], batch_size: int,
                  *, template: str | prompt_lib.PromptTemplate = "dapo", max_prompt_tokens: int = 1024,
                  prompt_bucket: int = 128, seed: int = 42, scorer: Scorer | None = None, reward_workers: int = 2,
                  save_completions: bool = False, log: Callable[[str], None] | None = _stderr) -> EvalResults:
    """`evaluate` with a sampler the caller keeps (training evaluates with its compiled sampler).

    With several JAX processes every host samples and scores its share of each batch (`batch_size`
    rows in all) and the results are gathered: every host returns the same EvalResults, equal to a
    one-process run's."""
    mesh = sampler.mesh
    hosts = jax.process_count()
    if mesh is not None and batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"batch_size {batch_size} must be divisible by the mesh's data x fsdp size "
                         f"{mesh.shape['data'] * mesh.shape['fsdp']}")
    if batch_size % hosts:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of hosts {hosts}")
    pool = None
    if scorer is None:
        pool = reward_lib.MathRewardPool(workers=reward_workers)
        scorer = pool
    total_rows = sum(len(recs) * ks[name] for name, recs in benchmarks.items())
    progress = _Progress(total_rows, log)
    results = {}
    try:
        for name, records in benchmarks.items():
            results[name] = _evaluate_one(
                name, records, ks[name], sampler, variables, tokenizer, scorer, batch_size=batch_size,
                template=template, max_prompt_tokens=max_prompt_tokens, prompt_bucket=prompt_bucket,
                key=jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF),
                save_completions=save_completions, progress=progress)
    finally:
        if pool is not None:
            pool.close()
    return EvalResults(results, time.perf_counter() - progress.t0, progress.tokens)


class _Progress:
    """Counts generated rows and tokens; logs 'benchmark: problems i/n, samples j/m, tokens/s'."""

    def __init__(self, total_rows: int, log: Callable[[str], None] | None):
        self.total_rows, self.log = total_rows, log
        self.rows = self.tokens = 0
        self.t0 = time.perf_counter()

    def update(self, name: str, rows: int, tokens: int, problems_done: int, problems: int) -> None:
        self.rows += rows
        self.tokens += tokens
        if self.log is not None:
            dt = time.perf_counter() - self.t0
            self.log(f"[eval] {name}: problems {problems_done}/{problems} | samples {self.rows}/{self.total_rows} "
                     f"| {self.tokens / max(dt, 1e-9):,.0f} tokens/s | {dt:.0f} s")


def _evaluate_one(name: str, records: Sequence[Mapping[str, str]], k: int, sampler: rollout.Sampler,
                  variables: dict, tokenizer: hf.Tokenizer, scorer: Scorer, *, batch_size: int,
                  template: str | prompt_lib.PromptTemplate,
                  max_prompt_tokens: int, prompt_bucket: int, key: jax.Array, save_completions: bool,
                  progress: _Progress) -> BenchmarkResult:
    ids, cut = prompt_lib.prompt_ids([r["problem"] for r in records], tokenizer, template, max_prompt_tokens)
    if cut and progress.log is not None:
        progress.log(f"[eval] warning: {name}: {cut} of {len(ids)} prompts were longer than {max_prompt_tokens} "
                     "tokens and were cut from the left")
    golds = [str(r["answer"]) for r in records]
    n_rows = len(records) * k
    order = sorted(range(n_rows), key=lambda row: (len(ids[row // k]), row))
    answers: list[str | None] = [None] * n_rows
    correct = np.zeros(n_rows, bool)
    lengths = np.zeros(n_rows, np.int64)
    finished = np.zeros(n_rows, bool)
    texts: list[str] | None = [""] * n_rows if save_completions else None
    remaining = np.full(len(records), k)
    hosts, me = jax.process_count(), jax.process_index()
    per_host = batch_size // hosts
    for start in range(0, n_rows, batch_size):
        rows = order[start:start + batch_size]
        batch_rows = rows + [rows[-1]] * (batch_size - len(rows))  # filler rows get budget 0 and are dropped
        mine = slice(me * per_host, (me + 1) * per_host)  # this host's rows of the batch
        width = prompt_bucket * math.ceil(max(len(ids[r // k]) for r in rows) / prompt_bucket)
        tokens, mask = rollout.left_pad([ids[r // k] for r in batch_rows[mine]], tokenizer.pad_id, width)
        budgets = np.full(batch_size, sampler.sampling.max_new_tokens, np.int32)
        budgets[len(rows):] = 0
        out = sampler(variables, tokens, mask, key, budgets=budgets[mine],
                      row_ids=np.asarray(batch_rows[mine], np.int32))
        mesh = sampler.mesh
        out = rollout.Rollout(*(jax.device_get(x) if mesh is None else mesh_lib.local_rows(x, mesh) for x in out))
        real = max(0, min(per_host, len(rows) - me * per_host))  # this host's rows that are not filler
        my_texts = rollout.decode_completions(tokenizer, out, real)
        my_rewards = [float(x) for x in scorer(my_texts, [golds[r // k] for r in batch_rows[mine][:real]])]
        shared = {"texts": my_texts, "rewards": my_rewards, "lengths": out.lengths[:real].tolist(),
                  "finished": out.finished[:real].tolist()}
        every = mesh_lib.gather_json(shared)
        joined = {key_: sum((h[key_] for h in every), []) for key_ in shared}
        for r, text, reward, n, done in zip(rows, joined["texts"], joined["rewards"], joined["lengths"],
                                            joined["finished"]):
            lengths[r], finished[r] = n, done
            if texts is not None:
                texts[r] = text
            answers[r] = reward_lib.extract_answer(text)
            correct[r] = reward >= 0.5
            remaining[r // k] -= 1
        progress.update(name, len(rows), int(lengths[rows].sum()), int(np.sum(remaining == 0)), len(records))
    problems = []
    for p, rec in enumerate(records):
        sl = slice(p * k, (p + 1) * k)
        problems.append(ProblemResult(
            index=p, problem=rec["problem"], gold=golds[p], answers=answers[sl], correct=correct[sl].tolist(),
            lengths=lengths[sl].tolist(), finished=finished[sl].tolist(),
            completions=texts[sl] if texts is not None else None))
    return BenchmarkResult(name, k, problems, cut)


# ---------------------------------------------------------------------------------------------
# the whole run from a config (launch/eval.py)

class InputError(ValueError):
    """A bad checkpoint, adapter, benchmark, output path or config value (found before sampling)."""


def run(c: Any, checkpoint: str | None = None, adapter: str | None = None, output: str | None = None,
        log: Callable[[str], None] | None = _stderr) -> EvalResults:
    """Loads the policy and benchmarks named by config `c` (configs/eval_math.py), evaluates, writes
    the JSON results to `output` (when given). `checkpoint` / `adapter` override the config's.

    With more than one device or JAX process (jax.distributed.initialize() called before), the model
    is placed on a mesh over every device (`c.mesh`), each process samples its share of every batch,
    every process returns the same results and the first one writes `output`."""
    checkpoint = checkpoint or c.checkpoint
    adapter = adapter if adapter is not None else c.get("adapter", "")
    try:
        if not checkpoint:
            raise ValueError("no checkpoint: pass --checkpoint=PATH (an HF directory) or set config.checkpoint")
        names = list(c.benchmarks)
        benchmarks = load_benchmarks(names, c.limit, c.data_dir or None, c.synthetic)
        unknown = [n for n in names if n not in c.k and not c.get("default_k")]
        if unknown:
            raise ValueError(f"no k for benchmarks {unknown}: set config.k.<name> or config.default_k")
        ks = {n: int(c.k.get(n, c.get("default_k", 0))) for n in names}
        prompt_lib.get_template(c.template)
        s = c.sampling
        sampling = rollout.SamplingConfig(s.max_new_tokens, s.temperature, s.top_p, s.top_k)
        if output:
            out = epath.Path(output)  # a local path or an object store (gs://...)
            if out.is_dir():
                raise ValueError(f"output {output!r} is a directory; expected a .json file path")
            out.parent.mkdir(parents=True, exist_ok=True)
        mesh = None
        if jax.device_count() > 1 or jax.process_count() > 1:  # every device of every process
            m = c.get("mesh") or {"data": -1, "fsdp": 1, "tensor": 1}
            mesh = mesh_lib.make_mesh(m["data"], m["fsdp"], m["tensor"])
        model, variables, tokenizer = load_policy(checkpoint, adapter or None, jnp.dtype(c.model.param_dtype),
                                                  jnp.dtype(c.model.dtype), mesh)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    results = evaluate(
        model, variables, tokenizer, benchmarks, ks, sampling, c.batch_size, template=c.template,
        max_prompt_tokens=c.max_prompt_tokens, prompt_bucket=c.prompt_bucket, seed=c.seed, mesh=mesh,
        reward_workers=c.reward_workers, save_completions=c.save_completions, log=log)
    if output and jax.process_index() == 0:
        payload = {"checkpoint": str(checkpoint), "adapter": adapter or None, "config": c.to_dict(),
                   "processes": jax.process_count(), "devices": jax.device_count(), **results.to_json()}
        epath.Path(output).write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    return results
