"""Orbax checkpoints of a training run: the trainable tree, optimizer state, method state, the data
iterator's position and the step; plus a snapshot of the resolved config. Restoring the latest step
resumes the run exactly (every random key is derived from the config seed and the step).

Every path goes through `etils.epath` (the layer orbax itself uses), so a workdir may be a local
folder or an object store (`gs://bucket/run`, `s3://...`) that every host of a pod sees.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxrl_peft.infra import mesh as mesh_lib

PathLike = str | os.PathLike | epath.Path


def is_local(path: PathLike) -> bool:
    """Whether `path` names the local filesystem (no `scheme://` prefix such as gs:// or s3://)."""
    return "://" not in os.fspath(path)


def workdir_path(workdir: PathLike) -> epath.Path:
    """The run directory as an epath: object-store URIs as given, local paths made absolute (orbax
    needs absolute local paths; `pathlib.Path('gs://b').absolute()` would make a local folder `gs:`)."""
    path = epath.Path(workdir)
    return path.absolute() if is_local(path) else path


class Checkpointer:
    """Saves and restores {'state': pytree, 'data': iterator state, 'meta': dict} under `workdir/ckpt`."""

    def __init__(self, workdir: PathLike, max_to_keep: int = 3):
        self.dir = workdir_path(workdir) / "ckpt"
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """`data_state` is this host's iterator state; every host's is saved (one list, process order)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"hosts": mesh_lib.gather_json(data_state)}),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) at `step`; abstract_state gives shapes, dtypes and shardings."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        hosts = out["data"]["hosts"]
        if len(hosts) != jax.process_count():
            raise ValueError(f"{self.dir}/{step}: written by {len(hosts)} host(s); resuming it needs the same "
                             f"number of JAX processes, not {jax.process_count()}")
        return out["state"], hosts[jax.process_index()], out["meta"]

    def close(self) -> None:
        self.manager.close()


def save_config(workdir: PathLike, config: Any) -> epath.Path:
    """Writes the resolved config (JSON) to `workdir/config.json`; a resumed run must match it.

    The first host alone reads and writes the file; its verdict is shared so every host stops together."""
    path = workdir_path(workdir) / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    error = ""
    if jax.process_index() == 0:
        if path.exists() and json.loads(path.read_text()) != json.loads(text):
            error = (f"{path}: this workdir belongs to a run with a different config; "
                     "use a new --workdir or the same config to resume")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    error = mesh_lib.gather_json(error)[0]
    if error:
        raise ValueError(error)
    return path


def read_state(workdir: PathLike, step: int) -> Any:
    """The saved state tree of `step` ({'adapter', 'opt', 'method'}) as numpy arrays, for inspection."""
    path = workdir_path(workdir) / "ckpt" / str(step) / "state"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint of step {step}")
    return jax.tree.map(np.asarray, ocp.PyTreeCheckpointer().restore(path))
