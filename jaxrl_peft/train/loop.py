"""THE training loop: every task (GRPO, supervised fine-tuning) trains through `train(task, config)`.

A task supplies four things (the `Task` protocol): how to build its model (`setup`), a checkpointable
source of host-local batches (`next_batch`, `data_state`, `restore_data_state`), a loss
`(params, adapter, batch, totals) -> (loss, sums)` and an evaluation. The loop owns the rest: the
adapter and its optimizer from the method's labels, explicit shardings for every piece of state,
gradient accumulation over micro-batches inside one jitted step (a `lax.scan`, so the micro-batch
loop makes no host transfer), the method's `on_step` inside the step, the NaN stop, checkpoints with
the data position and exact resume, metrics (JSONL, TensorBoard, console) and the run record.

The frozen state a task's functions receive is `frozen = {'base': params}` (plus 'initial_adapter', a
frozen copy of the adapter as initialised, when the task asks for it: the KL reference of PiSSA and
MiLoRA). Conventions a task's loss follows: the loss of a micro-batch is already divided by the global
normaliser (`totals`, the same on every host), so the micro-batch losses add up to the batch's loss;
`sums` holds metric sums plus a 'weight' entry, and the loop reports sum / weight; rows of zeros
(the padding that fills the last micro-batch) contribute nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_peft import peft
from jaxrl_peft.infra import checkpoint as ckpt_lib, mesh as mesh_lib, metrics as metrics_lib
from jaxrl_peft.models import hub
from jaxrl_peft.peft.base import PeftMethod
from jaxrl_peft.train import optimizer as optimizer_lib, state as state_lib

Array = jax.Array
# Purposes for deriving keys from the seed: fold_in(fold_in(key(seed), PURPOSE), step).
ADAPTER, ROLLOUT, EVAL, DATA = 3, 1, 2, 4


class ConfigError(ValueError):
    """A config value that cannot run; the message names the field and what it must be."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is not finite; the last good checkpoint is kept."""


@dataclasses.dataclass
class Setup:
    """What a task builds: the frozen base weights (placed on the mesh), their logical axis names
    (a tuple per leaf, same nesting) and the PEFT method fitted to them."""

    params: Any
    param_axes: Any
    method: PeftMethod
    keep_base: bool = False  # the base weights are needed although the method replaces them (KL reference)
    keep_initial_adapter: bool = False  # a frozen copy of the initial adapter is kept (KL reference)


class Task(Protocol):
    """The four things a task provides; everything else is the loop's."""

    name: str
    eval_metric: str  # the name of `evaluate`'s figure in metrics and in the last line
    progress_keys: tuple[str, ...]
    micro_batch_size: int  # global rows per forward/backward
    updates_per_batch: int
    data_files: dict[str, str]  # role -> path of every data file read (hashed into the run record)

    def setup(self, mesh: Mesh) -> Setup: ...

    def next_batch(self, step: int, frozen: Any, adapter: Any
                   ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
        """(this host's rows {name: [rows, ...]}, global totals {name: scalar}, host-side metrics) of `step`."""

    def data_state(self) -> Any: ...

    def restore_data_state(self, state: Any) -> None: ...

    def pre_update(self, frozen: Any, adapter: Any, batch: dict[str, Array]) -> dict[str, Array]:
        """Extra per-row arrays computed once before the updates of a batch (jitted); {} for none."""

    def loss(self, frozen: Any, adapter: Any, batch: dict[str, Array], totals: dict[str, Array]
             ) -> tuple[Array, dict[str, Array]]: ...

    def evaluate(self, frozen: Any, adapter: Any) -> float: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------ the step

def make_step(task: Task, method: PeftMethod, tx: optax.GradientTransformation) -> Any:
    """`step(frozen, state, batch, totals) -> (state, metrics)`: every micro-batch of `batch`
    ([micro_batches, rows, ...]) under one `lax.scan`, then one optimizer update and `on_step`."""

    def step(frozen, state: state_lib.TrainState, batch, totals):
        def grad_of(mb):
            return jax.value_and_grad(lambda a: task.loss(frozen, a, mb, totals), has_aux=True)(state.adapter)

        first = jax.tree.map(lambda x: x[0], batch)
        (_, sums0), _ = jax.eval_shape(grad_of, first)

        def micro(carry, mb):
            grads_acc, loss_acc, sums_acc = carry
            (loss, sums), grads = grad_of(mb)
            return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss,
                    jax.tree.map(jnp.add, sums_acc, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, state.adapter), jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0))
        (grads, loss, sums), _ = jax.lax.scan(micro, zeros, batch)
        reg, reg_grads = jax.value_and_grad(method.regularizer)(state.adapter)
        grads = jax.tree.map(jnp.add, grads, reg_grads)
        loss = loss + reg
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.adapter)
        adapter = optax.apply_updates(state.adapter, updates)
        adapter, method_state = method.on_step(state.step, grads, adapter, state.method_state)
        weight = jnp.maximum(sums.pop("weight"), 1.0)
        metrics = {"loss": loss, "grad_norm": grad_norm, **{k: v / weight for k, v in sums.items()}}
        return state_lib.TrainState(state.step + 1, adapter, opt_state, method_state), metrics

    return step


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """[micro_batches, rows, ...]: rows over the batch axes of the mesh, the rest replicated."""
    return NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (ndim - 2))))


def stack_micro_batches(rows: dict[str, np.ndarray], micro_batch_size: int, mesh: Mesh
                        ) -> dict[str, jax.Array]:
    """This host's rows -> [micro_batches, micro, ...] global arrays on the mesh (explicit transfers).

    Every host pads to the same number of micro-batches with rows of zeros; the per-host micro-batch is
    rounded up to a multiple of this host's share of the batch axes, so any row count shards."""
    hosts = jax.process_count()
    n = next(iter(rows.values())).shape[0]
    most = int(mesh_lib.gather_hosts(n).max())
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    per_host_devices = max(1, batch_devices // hosts)
    micro = max(1, min(micro_batch_size // hosts, most))
    micro = -(-micro // per_host_devices) * per_host_devices
    count = max(1, -(-most // micro))
    out = {}
    for name, x in rows.items():
        padded = np.zeros((count * micro,) + x.shape[1:], x.dtype)
        padded[:n] = x
        # Local row r goes to micro-batch r % count: every micro-batch then holds the same global rows,
        # in the same order on the same devices, whatever the number of hosts (so the sums do too).
        local = padded.reshape((micro, count) + x.shape[1:]).swapaxes(0, 1)
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
    return out


# ------------------------------------------------------------------------------------------ the run

def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "math-verify", "tokenizers")


def run_record(c: ml_collections.ConfigDict, mesh: Mesh, data_files: dict[str, str] | None = None) -> dict:
    """Code version, packages, devices and mesh, seed, hashes of the resolved config and of the data."""
    resolved = c.to_json_best_effort(sort_keys=True)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    files = {}
    for role, path in (data_files or {}).items():
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                files[role] = {"path": str(path), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        elif path and os.path.isdir(path):  # a checkpoint directory: from the hub cache, its commit
            files[role] = {"path": str(path), "hub_commit": hub.commit_of(path)}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(), "packages": versions, "argv": sys.argv,
        "devices": {"count": jax.device_count(), "kind": jax.devices()[0].device_kind,
                    "platform": jax.devices()[0].platform, "processes": jax.process_count()},
        "mesh": dict(mesh.shape), "seed": c.seed,
        "config_sha256": hashlib.sha256(resolved.encode()).hexdigest(), "data_files": files,
    }


@dataclasses.dataclass
class Run:
    """A built run: placed state and the jitted functions, before any step (also what a dry run reads)."""

    task: Task
    mesh: Mesh
    method: PeftMethod
    frozen: dict[str, Any]  # {'base': params[, 'initial_adapter': adapter as initialised]}
    state: state_lib.TrainState
    shardings: state_lib.Shardings
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    results: dict[str, float] = dataclasses.field(default_factory=dict)

    def state_bytes_per_device(self) -> int:
        return state_lib.state_bytes_per_device((self.frozen, self.state))

    @functools.cached_property
    def step_fn(self):
        sh = self.shardings
        totals_sh = mesh_lib.replicated(self.mesh)
        return jax.jit(make_step(self.task, self.method, self.tx), donate_argnums=(1,),
                       in_shardings=(sh.frozen, sh.train, None, totals_sh),
                       out_shardings=(sh.train, totals_sh))

    @functools.cached_property
    def pre_update_fn(self):
        def pre(frozen, adapter, batch):
            return jax.lax.map(lambda mb: self.task.pre_update(frozen, adapter, mb), batch)
        return jax.jit(pre)

    def update(self, rows: dict[str, np.ndarray], totals: dict[str, float]) -> dict[str, float]:
        """`updates_per_batch` optimizer updates over this host's `rows`; metrics of the last one.
        Raises TrainingDiverged (before anything is saved) when the loss or gradient is not finite."""
        batch = stack_micro_batches(rows, self.task.micro_batch_size, self.mesh)
        totals = jax.device_put({k: jnp.float32(v) for k, v in totals.items()}, mesh_lib.replicated(self.mesh))
        extra = self.pre_update_fn(self.frozen, self.state.adapter, batch)
        batch = {**batch, **extra}
        for _ in range(self.task.updates_per_batch):
            with jax.transfer_guard("disallow"):  # the micro-batch loop runs on the devices alone
                self.state, metrics = self.step_fn(self.frozen, self.state, batch, totals)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                raise TrainingDiverged(f"update {int(self.state.step)}: loss={metrics['loss']} "
                                       f"grad_norm={metrics['grad_norm']}; the last good checkpoint is kept")
        return metrics


def build(task: Task, c: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Run:
    """Builds the model, the adapter, the optimizer and the placed state of the run `c`."""
    mesh = mesh or mesh_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    setup = task.setup(mesh)
    method = setup.method
    key = jax.random.fold_in(jax.random.key(c.seed), ADAPTER)
    params, adapter = peft.init_adapter(method, key, setup.params)
    if not setup.keep_base:
        params = peft.registry.drop_replaced(method, params, adapter)
    # Per-layer targets unroll the layers: the axes follow the layout init_adapter returned.
    param_axes, keep_initial = peft.registry.axes_like(setup.param_axes, params), setup.keep_initial_adapter
    del setup
    tx, sched = optimizer_lib.make(method, adapter, c.optim, c.steps * task.updates_per_batch)
    state = state_lib.TrainState(jnp.zeros((), jnp.int32), adapter, tx.init(adapter), method.init_state(adapter))
    sh = state_lib.shardings(method, tx, params, param_axes, state, mesh, keep_initial)
    frozen = {"base": params}
    if keep_initial:
        frozen["initial_adapter"] = jax.tree.map(jnp.copy, adapter)
    frozen = state_lib.place(frozen, sh.frozen)
    state = state_lib.place(state, sh.train)
    return Run(task, mesh, method, frozen, state, sh, tx, sched)


def train(task: Task, c: ml_collections.ConfigDict, workdir: str | os.PathLike | epath.Path,
          mesh: Mesh | None = None) -> Run:
    """Runs (or resumes, when `workdir` holds a checkpoint) the run `c` of `task`; returns the run,
    its final state and its evaluation figure before and after training (`run.results`)."""
    workdir = ckpt_lib.workdir_path(workdir)  # local, gs://, s3://, ...: every file goes through epath
    first_host = jax.process_index() == 0  # the one host that writes the shared files
    ckpt_lib.save_config(workdir, c)
    run = build(task, c, mesh)
    record = workdir / "run.json"
    if first_host and not record.exists():  # a resumed run keeps its original record
        record.write_text(json.dumps(run_record(c, run.mesh, task.data_files), indent=2))
    print(f"state_bytes_per_device={run.state_bytes_per_device()}", flush=True)
    checkpointer = ckpt_lib.Checkpointer(workdir)
    writer = metrics_lib.MetricWriter(workdir, enabled=first_host)
    name = task.eval_metric
    try:
        latest = checkpointer.latest_step()
        step = 0
        if latest is not None:
            restored, data_state, meta = _restore(checkpointer, latest, run.state, workdir)
            run.state = state_lib.TrainState(jnp.asarray(meta["updates"], jnp.int32), restored["adapter"],
                                             restored["opt"], restored["method"])
            run.state = state_lib.place(run.state, run.shardings.train)
            task.restore_data_state(data_state)
            before, step = meta["eval_before"], latest
            writer.truncate_after(latest)
            print(f"resumed from {checkpointer.dir} at step {latest}", flush=True)
        else:
            before = task.evaluate(run.frozen, run.state.adapter)
            print(f"{name} at start: {before:.3f}", flush=True)
        progress = metrics_lib.Progress(c.steps, task.progress_keys)
        t_start = time.perf_counter()
        while step < c.steps:
            step += 1
            t0 = time.perf_counter()
            rows, totals, m = task.next_batch(step, run.frozen, run.state.adapter)
            t1 = time.perf_counter()
            if rows:
                m.update(run.update(rows, totals))
            m["learning_rate"] = float(run.schedule(max(int(run.state.step) - 1, 0)))
            m["time_update"], m["time_step"] = time.perf_counter() - t1, time.perf_counter() - t0
            if c.eval_every and step % c.eval_every == 0 and step != c.steps:
                m[name] = task.evaluate(run.frozen, run.state.adapter)
            writer.write(step, m)
            if first_host and step % c.log_every == 0:
                progress(step, m)
            if step % c.checkpoint_every == 0 or step == c.steps:
                writer.flush()  # the metrics file holds every step the checkpoint does
                checkpointer.save(step, _checkpoint_tree(run.state), task.data_state(),
                                  {"eval_before": before, "updates": int(run.state.step)})
        after = task.evaluate(run.frozen, run.state.adapter)
    finally:
        writer.close()
        checkpointer.close()
        task.close()
    print(f"trained {c.steps} steps in {time.perf_counter() - t_start:.0f} s; workdir {workdir}", flush=True)
    print(f"{name} before={before:.3f} after={after:.3f}", flush=True)
    run.results = {f"{name}_before": before, f"{name}_after": after}
    return run


def _restore(checkpointer: ckpt_lib.Checkpointer, step: int, state: state_lib.TrainState, workdir: Any):
    """The checkpoint of `step`, or a clear error when its adapter tree is not this run's (a workdir
    written before the layers were stacked holds the decoder's `layers_<i>` or RWKV-7's `blocks_<i>` keys)."""
    try:
        return checkpointer.restore(step, _checkpoint_tree(state))
    except (ValueError, KeyError, TypeError) as e:
        saved = ckpt_lib.read_state(workdir, step)["adapter"]
        if jax.tree.structure(saved) == jax.tree.structure(jax.device_get(state.adapter)):
            raise
        old = sorted(k for k in saved if peft.registry.stack_of(k) in state.adapter)
        layers = ("the decoder's layers" if old and peft.registry.stack_of(old[0]) == peft.registry.LAYERS
                  else "RWKV-7's blocks 1 ... L-1")
        hint = (f" It holds per-layer keys ({old[0]} ...): it was written before {layers} were "
                "stacked; convert its adapter with jaxrl_peft.peft.registry.stack_layers or start a new --workdir."
                if old else " Use the same config and code, or a new --workdir.")
        raise ConfigError(f"{workdir}: the checkpoint of step {step} holds a different adapter tree than this "
                          f"run builds.{hint}") from e


def _checkpoint_tree(state: state_lib.TrainState) -> dict[str, Any]:
    return {"adapter": state.adapter, "opt": state.opt_state, "method": state.method_state}
