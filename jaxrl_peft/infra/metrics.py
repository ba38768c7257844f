"""Metric writers: one JSON line per step, TensorBoard scalars, and a console progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class MetricWriter:
    """Appends {'step': s, **metrics} to `workdir/metrics.jsonl` and writes TensorBoard scalars.

    `truncate_after(step)` drops lines past a restored checkpoint, so a resumed run's file equals an
    uninterrupted run's.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True):
        self.dir = Path(workdir)
        self.enabled = enabled  # False on every host but the first of a multi-host run
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


class Progress:
    """A console line per logged step: step/total, chosen metrics, throughput and ETA."""

    def __init__(self, total: int, keys: tuple[str, ...], stream=sys.stdout):
        self.total, self.keys, self.stream = total, keys, stream
        self.t0 = time.perf_counter()
        self.first_step: int | None = None

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if self.first_step is None:
            self.first_step = step - 1
        done = step - self.first_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = " ".join(f"{k}={_fmt(metrics[k])}" for k in self.keys if k in metrics)
        print(f"step {step}/{self.total} {parts} | {elapsed:.0f}s elapsed, eta {eta:.0f}s", file=self.stream,
              flush=True)


def _fmt(v: Any) -> str:
    v = _plain(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)
