"""Method sweeps (the study's Figure 1): one training run per (method, seed), each in its own workdir
and its own process, then a table and plots of held-out accuracy against trainable-parameter share and
of the train reward by step.

Each run is `python launch/train.py --config=configs/grpo_<method>.py[:arg] --config.seed=<k> ...`, so a
crash or an out-of-memory of one method leaves the others running. A run counts as finished when its
workdir holds the final checkpoint, a metrics line of the final step and the `result.json` the sweep
writes after it; finished runs are skipped, so a sweep that stops can be started again with the same
command (unfinished runs resume from their last checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxrl_peft.analysis.report import PLOTS_EXTRA_HINT
from jaxrl_peft.train import memory, rerun

RESULT = "result.json"  # what the sweep writes into a run's workdir once the run has ended
LOG = "train.log"  # the run's console output
FINAL_REWARD_STEPS = 10  # the final train reward is the mean reward of the last this many steps
_RESULT_LINE = re.compile(r"^(\w+) before=(\S+) after=(\S+)$")


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a method's config file, its argument, a seed and the workdir."""

    method: str
    seed: int
    config_file: Path
    config_arg: str
    workdir: Path

    @property
    def config_flag(self) -> str:
        return f"{self.config_file}:{self.config_arg}" if self.config_arg else str(self.config_file)


def split_config_flag(config: str) -> tuple[Path, str]:
    """'configs/grpo_dora.py:tiny' -> (path, 'tiny'); the directory holds the grpo_<method>.py files."""
    file, _, arg = config.partition(":")
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"--config={config}: {file} is not a file (expected configs/grpo_<method>.py[:tiny])")
    return path, arg


# configs/grpo_<name>.py files that are a model family's entry, not a PEFT method of the decoder.
FAMILY_CONFIGS = ("rwkv7",)


def available_methods(config_dir: Path) -> list[str]:
    """The methods with a configs/grpo_<method>.py file (14 in this repository)."""
    return sorted(name for p in config_dir.glob("grpo_*.py")
                  if (name := p.stem.removeprefix("grpo_")) not in FAMILY_CONFIGS)


def load_config_file(path: Path, arg: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file (as launch/train.py's --config reads it)."""
    spec = importlib.util.spec_from_file_location(f"_sweep_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without them, the --config.<field>=<value> flags) of a command line: the overrides are
    not the sweep's flags but are passed on to every run."""
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def check_overrides(c: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Every '--config.a.b=value' names a field of the config `c` (before any run starts)."""
    for flag in overrides:
        match = re.fullmatch(r"--config\.([\w.]+)=(.*)", flag)
        if match is None:
            raise ValueError(f"{flag!r}: expected --config.<field>=<value>")
        if match.group(1) == "seed":
            raise ValueError(f"{flag}: a sweep sets the seed of each run; use --seeds=42,43")
        node: Any = c
        for name in match.group(1).split("."):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise ValueError(f"{flag}: the config has no field {match.group(1)!r}")
            node = node[name]


def plan(config: str, methods: Sequence[str] | None, seeds: Sequence[int], out: str | os.PathLike,
         overrides: Sequence[str] = ()) -> list[SweepRun]:
    """The runs of a sweep: every method (default: all configs/grpo_*.py next to `config`) x seed,
    workdirs OUT/<method>/seed<k>; `overrides` must name fields of the base config."""
    base_file, arg = split_config_flag(config)
    known = available_methods(base_file.parent)
    methods = list(methods) if methods else known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"--methods: no config for {unknown} in {base_file.parent}; expected some of {known}")
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    check_overrides(load_config_file(base_file, arg), overrides)
    out = Path(out).absolute()
    return [SweepRun(m, int(s), (base_file.parent / f"grpo_{m}.py").absolute(), arg, out / m / f"seed{s}")
            for m in methods for s in seeds]


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows in step order ([] when the run wrote none)."""
    try:
        return rerun.read_metrics(workdir)
    except FileNotFoundError:
        return []


def is_finished(workdir: Path) -> bool:
    """The run's final checkpoint, the metrics of its final step and the sweep's result are there."""
    try:
        steps = json.loads((workdir / "config.json").read_text())["steps"]
        result = json.loads((workdir / RESULT).read_text())
    except (OSError, ValueError, KeyError):
        return False
    rows = read_metrics(workdir)
    return (result.get("status") == "ok" and (workdir / "ckpt" / str(steps)).is_dir()
            and bool(rows) and rows[-1]["step"] == steps)


def train_command(run: SweepRun, overrides: Sequence[str], train_script: Path) -> list[str]:
    return [sys.executable, str(train_script), f"--config={run.config_flag}", f"--config.seed={run.seed}",
            *overrides, f"--workdir={run.workdir}"]


def execute(run: SweepRun, overrides: Sequence[str], train_script: Path,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains one run in a subprocess (its output streamed to `log` and to WORKDIR/train.log) and writes
    WORKDIR/result.json: status, held-out accuracy before/after (from the run's last line), seconds."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    root = str(train_script.resolve().parents[1])  # the repository: configs/ and the packages
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    prefix = f"[{run.method}/seed{run.seed}]"
    result: dict[str, Any] = {"status": "failed"}
    start = time.perf_counter()
    with open(run.workdir / LOG, "a") as logfile:
        proc = subprocess.Popen(train_command(run, overrides, train_script), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        tail: list[str] = []
        for line in proc.stdout:
            logfile.write(line)
            line = line.rstrip("\n")
            tail = (tail + [line])[-20:]
            log(f"{prefix} {line}")
            match = _RESULT_LINE.match(line)
            if match:
                result.update(metric=match.group(1), before=float(match.group(2)), after=float(match.group(3)))
        returncode = proc.wait()
    result["seconds"] = time.perf_counter() - start
    result["returncode"] = returncode
    if returncode == 0 and "after" in result:
        result["status"] = "ok"
    else:
        result["error"] = "\n".join(tail)
    (run.workdir / RESULT).write_text(json.dumps(result, indent=1))
    return result


def _counts(workdir: Path) -> tuple[int | None, int | None]:
    """(trainable, total) parameters of the run's resolved config, from shapes alone."""
    try:
        estimate = memory.estimate(rerun.load_config(workdir), chips=1)
    except (FileNotFoundError, ValueError):
        return None, None
    return estimate.trainable_params, estimate.total_params


def collect(run: SweepRun) -> dict[str, Any]:
    """One table row of a run: counts, held-out before/after, final train reward, rewards by step, time."""
    try:
        result = json.loads((run.workdir / RESULT).read_text())
    except (OSError, ValueError):
        result = {"status": "not run"}
    rows = read_metrics(run.workdir)
    rewards = [r.get("reward", float("nan")) for r in rows]
    trainable, total = _counts(run.workdir)
    return {
        "method": run.method, "seed": run.seed, "workdir": str(run.workdir), "status": result.get("status"),
        "trainable_params": trainable, "total_params": total,
        "trainable_share": trainable / total if trainable is not None and total else None,
        "heldout_before": result.get("before"), "heldout_after": result.get("after"),
        "final_reward": float(np.mean(rewards[-FINAL_REWARD_STEPS:])) if rewards else None,
        "reward_by_step": rewards, "steps": len(rows),
        "train_seconds": float(sum(r.get("time_step", 0.0) for r in rows)),
        "wall_seconds": result.get("seconds"), "error": result.get("error"),
    }


AGGREGATED = ("heldout_before", "heldout_after", "final_reward", "train_seconds")


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per method (in row order): counts, and mean and spread (sample standard deviation over
    seeds; 0 for one seed) of each AGGREGATED figure over the method's finished runs."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        entry: dict[str, Any] = {"method": method, "seeds": [r["seed"] for r in mine], "finished": len(ok),
                                 "status": ", ".join(sorted({str(r["status"]) for r in mine}))}
        for key in ("trainable_params", "total_params", "trainable_share"):
            entry[key] = next((r[key] for r in mine if r[key] is not None), None)
        for key in AGGREGATED:
            values = [r[key] for r in ok if r[key] is not None]
            entry[key] = float(np.mean(values)) if values else None
            entry[f"{key}_spread"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0 if values else None
        curves = [r["reward_by_step"] for r in ok if r["reward_by_step"]]
        steps = min((len(c) for c in curves), default=0)
        entry["reward_by_step"] = np.mean([c[:steps] for c in curves], axis=0).tolist() if steps else []
        out.append(entry)
    return out


def _fmt(value: float | None, spread: float | None, seeds: int, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} ± {spread:.{digits}f}" if seeds > 1 and spread is not None else text


def markdown(methods: Sequence[dict[str, Any]], seeds: Sequence[int], meta: dict[str, Any]) -> str:
    """The sweep table: one row per method (mean ± sample std over seeds when there are several)."""
    n = len(seeds)
    lines = ["# Method sweep", "",
             f"config `{meta['config']}`, overrides `{' '.join(meta['overrides']) or 'none'}`, "
             f"seeds {', '.join(map(str, seeds))}" + (" (mean ± sample std over seeds)" if n > 1 else ""),
             f"final train reward: mean reward of the last {FINAL_REWARD_STEPS} steps", "",
             "| method | trainable params | share | held-out before | held-out after | final train reward "
             "| time (s) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for m in methods:
        count = f"{m['trainable_params']:,}" if m["trainable_params"] is not None else "–"
        share = f"{100 * m['trainable_share']:.3g}%" if m["trainable_share"] is not None else "–"
        lines.append(f"| {m['method']} | {count} | {share} | "
                     f"{_fmt(m['heldout_before'], m['heldout_before_spread'], n)} | "
                     f"{_fmt(m['heldout_after'], m['heldout_after_spread'], n)} | "
                     f"{_fmt(m['final_reward'], m['final_reward_spread'], n)} | "
                     f"{_fmt(m['train_seconds'], m['train_seconds_spread'], n, 0)} | "
                     f"{m['finished']}/{len(m['seeds'])} finished ({m['status']}) |")
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"sweep plots need matplotlib: {PLOTS_EXTRA_HINT}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(methods: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """accuracy_vs_share.png (held-out accuracy after training against trainable share, log x axis,
    the base model's accuracy dashed) and reward_by_step.png (train reward by step, every method)."""
    plt = _pyplot()
    written = []
    fig, ax = plt.subplots(figsize=(7, 5))
    points = [m for m in methods if m["trainable_share"] and m["heldout_after"] is not None]
    markers = "osD^vP*Xh<>p8d"
    for i, m in enumerate(points):
        ax.errorbar(m["trainable_share"] * 100, m["heldout_after"], yerr=m["heldout_after_spread"] or 0,
                    fmt=markers[i % len(markers)], capsize=3, label=m["method"])
    before = [m["heldout_before"] for m in points if m["heldout_before"] is not None]
    if before:
        ax.axhline(float(np.mean(before)), ls="--", color="gray", label="before training")
    ax.legend(fontsize=7, ncol=2)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model)")
    ax.set_ylabel("held-out accuracy after training")
    ax.set_title("Held-out accuracy vs trainable share")
    fig.tight_layout()
    written.append(out / "accuracy_vs_share.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        if m["reward_by_step"]:
            ax.plot(range(1, len(m["reward_by_step"]) + 1), m["reward_by_step"], label=m["method"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("train reward")
    ax.set_title("Train reward by step")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(out / "reward_by_step.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def write_outputs(runs: Sequence[SweepRun], out: str | os.PathLike, meta: dict[str, Any],
                  plots: bool = True) -> list[Path]:
    """sweep.json (meta, every run's row, per-method aggregates), sweep.md and the plots into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [collect(r) for r in runs]
    methods = aggregate(rows)
    seeds = list(dict.fromkeys(r.seed for r in runs))
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "methods": methods, "runs": rows}, indent=1))
    (out / "sweep.md").write_text(markdown(methods, seeds, meta))
    written = [out / "sweep.json", out / "sweep.md"]
    if plots:
        written += plot(methods, out)
    return written


def sweep(runs: Sequence[SweepRun], overrides: Sequence[str], train_script: Path,
          log: Callable[[str], None] = print) -> dict[str, int]:
    """Trains every unfinished run in turn (one subprocess each); counts of ran / skipped / failed."""
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    for i, run in enumerate(runs, 1):
        head = f"[sweep {i}/{len(runs)}] {run.method} seed {run.seed}"
        if is_finished(run.workdir):
            log(f"{head}: finished earlier, skipped ({run.workdir})")
            counts["skipped"] += 1
            continue
        log(f"{head}: training in {run.workdir}")
        result = execute(run, overrides, train_script, log)
        counts["ran"] += 1
        if result["status"] == "ok":
            log(f"{head}: held-out {result['before']:.3f} -> {result['after']:.3f} in {result['seconds']:.0f} s")
        else:
            counts["failed"] += 1
            log(f"{head}: FAILED (exit status {result['returncode']}); see {run.workdir / LOG}")
    return counts
