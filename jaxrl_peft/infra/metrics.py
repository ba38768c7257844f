"""Metric writers: one JSON line per step, TensorBoard scalars, and a console progress line.

Files go through `etils.epath`, so the workdir may be an object store. Object stores cannot append:
there the writer keeps the run's lines in memory and rewrites `metrics.jsonl` on `flush()` (the loop
flushes before every checkpoint, so a checkpoint never holds steps the file lacks), and TensorBoard
events are written to a local temporary folder and copied to `WORKDIR/tensorboard/` on each flush.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from tensorboardX import SummaryWriter

from jaxrl_peft.infra.checkpoint import PathLike, is_local, workdir_path


class MetricWriter:
    """Writes {'step': s, **metrics} as a line of `workdir/metrics.jsonl` and as TensorBoard scalars.

    `truncate_after(step)` drops lines past a restored checkpoint, so a resumed run's file equals an
    uninterrupted run's. A local workdir gets each line appended at once; an object store gets the
    whole file rewritten on `flush()` and at most every `flush_secs` seconds.
    """

    def __init__(self, workdir: PathLike, tensorboard: bool = True, enabled: bool = True,
                 flush_secs: float = 60.0):
        self.dir = workdir_path(workdir)
        self.enabled = enabled  # False on every host but the first of a multi-host run
        self.local = is_local(self.dir)
        self.path = self.dir / "metrics.jsonl"
        self.flush_secs = flush_secs
        self._lines: list[str] = []  # every line of the file, as it will be after the next flush
        self._last_flush = time.monotonic()
        self._tb = None
        self._tb_staging: str | None = None  # local folder of the events of a non-local workdir
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._lines = [line for line in self.path.read_text().splitlines() if line]
        if tensorboard and enabled:
            if self.local:
                self._tb = SummaryWriter(os.fspath(self.dir / "tensorboard"))
            else:
                self._tb_staging = tempfile.mkdtemp(prefix="tensorboard-")
                # a unique file name: a copy must not replace the events of an earlier (killed) run
                suffix = "." + os.path.basename(self._tb_staging).removeprefix("tensorboard-")
                self._tb = SummaryWriter(self._tb_staging, filename_suffix=suffix)

    def truncate_after(self, step: int) -> None:
        """Drops every line of a step after `step` (the restored checkpoint) from memory and the file."""
        if not self.enabled:
            return
        self._lines = [line for line in self._lines if json.loads(line)["step"] <= step]
        self._rewrite()

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(row)
        self._lines.append(line)
        if self.local:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if not self.local and time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Makes every line and event written so far visible in the workdir."""
        if not self.enabled:
            return
        if not self.local:
            self._rewrite()
        if self._tb is not None:
            self._tb.flush()
            self._copy_events()
        self._last_flush = time.monotonic()

    def read(self) -> list[dict[str, Any]]:
        """The rows written so far (this run's and the restored ones)."""
        if self.enabled:
            return [json.loads(line) for line in self._lines]
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._tb is not None:
            self._tb.close()
            self._copy_events()
        if self._tb_staging is not None:
            shutil.rmtree(self._tb_staging, ignore_errors=True)

    def _rewrite(self) -> None:
        self.path.write_text("".join(line + "\n" for line in self._lines))

    def _copy_events(self) -> None:
        """Copies the staged event files of a non-local workdir to `workdir/tensorboard/` (whole files:
        object stores cannot append)."""
        if self._tb_staging is None:
            return
        target = self.dir / "tensorboard"
        for folder, _, names in os.walk(self._tb_staging):
            for name in names:
                source = os.path.join(folder, name)
                destination = target / os.path.relpath(source, self._tb_staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with open(source, "rb") as f:
                    destination.write_bytes(f.read())


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
