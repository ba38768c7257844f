"""Reproducible reruns: re-execute a run from its record (`config.json`, `run.json`) in a fresh workdir
and compare its metrics step by step with the recorded ones. Also the readers of a run directory
(config, metrics, the trained adapter of a checkpoint) that reruns and launch/analyze.py --run share.

Every metric of `metrics.jsonl` is compared exactly except wall-clock times and throughputs
(`time_*`, `tokens_per_s`). Differences of code, package versions or devices from `run.json` are
reported as warnings, since they may explain a difference without being one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxrl_peft import peft
from jaxrl_peft.infra import checkpoint as ckpt_lib
from jaxrl_peft.models import hf
from jaxrl_peft.peft import registry
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.rl import grpo
from jaxrl_peft.train import loop, sft

TASKS = {"grpo": grpo.GRPOTask, "sft": sft.SFTTask}
RECORD_FIELDS = ("git_commit", "git_dirty", "packages", "devices")  # compared with the rerun's run.json


def is_timing(name: str) -> bool:
    """Wall-clock times and throughputs differ between identical runs; they are not compared."""
    return name.startswith("time_") or name == "tokens_per_s"


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config files use (every sequence in configs/ is a tuple)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _config_dict(value: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: _config_dict(v) if isinstance(v, dict) else v for k, v in value.items()})


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `workdir/config.json`, as the ConfigDict it was built from."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no config.json; runs of launch/train.py write one)")
    return _config_dict(_tuples(json.loads(path.read_text())))


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of `workdir/metrics.jsonl` ({'step': s, metric: value}), in step order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run wrote no metrics")
    return sorted((json.loads(line) for line in path.read_text().splitlines() if line), key=lambda r: r["step"])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps with a saved checkpoint under WORKDIR/ckpt, ascending."""
    ckpt = Path(workdir) / "ckpt"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def load_run_adapter(workdir: str | os.PathLike, step: int | None = None, dtype: str = "float32"
                     ) -> tuple[PeftMethod, dict, dict, dict[str, Any]]:
    """(method, params the adapter trains against, trained adapter of `step` (default: the latest
    checkpoint), meta) of a training workdir, for the spectral analysis of a run.

    The base checkpoint and the method come from config.json; a residual method's (PiSSA, MiLoRA) base is
    rebuilt by `peft.init_adapter` with the run's own key, so merging its saved adapter is exact."""
    workdir = Path(workdir)
    c = load_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir / 'ckpt'}: the run saved no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"--step={step}: {workdir / 'ckpt'} holds steps {steps}")
    _, params = hf.load(c.model.checkpoint, dtype=dtype)
    method = registry.from_config(c.peft).prepare(params)
    if method.residual:
        key = jax.random.fold_in(jax.random.key(c.seed), loop.ADAPTER)  # the key loop.build used
        params, _ = peft.init_adapter(method, key, params)
    adapter = ckpt_lib.read_state(workdir, step)["adapter"]
    meta = {"run": str(workdir), "step": step, "checkpoint": c.model.checkpoint, "peft_method": method.name,
            "peft": c.peft.to_dict()}
    return method, params, adapter, meta


@dataclasses.dataclass
class Comparison:
    """The first difference of two metric streams (None when they agree on `steps` steps)."""

    steps: int
    step: int | None = None
    metric: str | None = None
    recorded: Any = None
    rerun: Any = None

    @property
    def identical(self) -> bool:
        return self.step is None

    def line(self) -> str:
        if self.identical:
            return f"rerun: identical ({self.steps} steps)"
        return f"rerun: differs at step {self.step}: {self.metric} {self.recorded} vs {self.rerun}"


def compare_metrics(recorded: list[dict[str, Any]], rerun: list[dict[str, Any]], steps: int) -> Comparison:
    """Compares the first `steps` steps of two metrics.jsonl streams, every metric except timings;
    a step or metric present in one stream only is a difference."""
    old = {r["step"]: r for r in recorded}
    new = {r["step"]: r for r in rerun}
    for step in range(1, steps + 1):
        a, b = old.get(step), new.get(step)
        if a is None or b is None:
            return Comparison(steps, step, "<step missing>", "present" if a else "missing",
                              "present" if b else "missing")
        for name in sorted(set(a) | set(b)):
            if is_timing(name):
                continue
            if not _same(a.get(name, "missing"), b.get(name, "missing")):
                return Comparison(steps, step, name, a.get(name, "missing"), b.get(name, "missing"))
    return Comparison(steps)


def record_warnings(recorded: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """One line per field of run.json (code version, dirty tree, packages, devices) that differs."""
    out = []
    for field in RECORD_FIELDS:
        a, b = recorded.get(field), rerun.get(field)
        if field == "packages" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"warning: package {name}: recorded {a.get(name)}, now {b.get(name)}")
        elif a != b:
            out.append(f"warning: {field}: recorded {a}, now {b}")
    if recorded.get("git_dirty") or rerun.get("git_dirty"):
        out.append("warning: the working tree had uncommitted changes (recorded or now): the code may differ")
    return list(dict.fromkeys(out))


class _StopAfter:
    """A task that stops the loop after `steps` steps (keeps the recorded schedule and eval steps)."""

    def __init__(self, task: Any, steps: int):
        self._task, self._steps = task, steps

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def next_batch(self, step: int, frozen: Any, adapter: Any):
        if step > self._steps:
            raise _Stop
        return self._task.next_batch(step, frozen, adapter)


class _Stop(Exception):
    pass


def fresh_workdir(run_dir: Path) -> Path:
    """RUN_DIR/rerun-<n> for the first n not yet used."""
    n = 1
    while (run_dir / f"rerun-{n}").exists():
        n += 1
    return run_dir / f"rerun-{n}"


def rerun(run_dir: str | os.PathLike, steps: int | None = None, workdir: str | os.PathLike | None = None,
          log: Any = print) -> Comparison:
    """Re-executes the run recorded in `run_dir` for its first `steps` steps (default: as many as its
    metrics hold) in `workdir` (default RUN_DIR/rerun-<n>), logs warnings about the record, and returns
    the comparison of the two metric streams."""
    run_dir = Path(run_dir)
    c = load_config(run_dir)
    recorded = read_metrics(run_dir)
    task_name = c.get("task", "grpo")
    if task_name not in TASKS:
        raise ValueError(f"{run_dir / 'config.json'}: task {task_name!r} is not one of {sorted(TASKS)}")
    available = max((r["step"] for r in recorded), default=0)
    steps = available if steps is None else steps
    if not 1 <= steps <= available:
        raise ValueError(f"--steps={steps}: the record holds steps 1..{available}")
    workdir = Path(workdir) if workdir else fresh_workdir(run_dir)
    if (workdir / "metrics.jsonl").exists() or (workdir / "ckpt").exists():
        raise ValueError(f"{workdir}: not a fresh workdir (it holds a run); pass a new --workdir")
    task = TASKS[task_name](c)
    try:
        loop.train(task if steps == c.steps else _StopAfter(task, steps), c, workdir)
    except _Stop:
        pass
    record_path = run_dir / "run.json"
    if record_path.is_file():
        for line in record_warnings(json.loads(record_path.read_text()),
                                    json.loads((workdir / "run.json").read_text())):
            log(line)
    else:
        log(f"warning: {record_path} is missing: code, versions and devices cannot be checked")
    return compare_metrics(recorded, read_metrics(workdir), steps)
