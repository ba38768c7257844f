"""A workdir on an object store (gs://) holds what a local workdir holds, and resumes the same.

The store is a test double: fsspec's `gcs` protocol (what etils.epath uses for gs://) is replaced by a
folder-backed file system that, like GCS, refuses to append; orbax's TensorStore spec for gs:// is
pointed at the same folder. Nothing may be written to the current directory.
"""

import json
import operator
import os
import socket
import subprocess
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry
from jax.experimental import multihost_utils
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX.proto import event_pb2

from configs import eval_math
from configs.grpo_dora import get_config
from jaxrl_peft.eval import math_eval
from jaxrl_peft.infra import checkpoint, mesh as mesh_lib, metrics
from jaxrl_peft.rl import grpo
from jaxrl_peft.train import loop

ROOT = Path(__file__).resolve().parents[3]
RECORDS = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(64)]
TIMING = ("tokens_per_s",)


class FakeGCS(LocalFileSystem):
    """gs://bucket/key is the file `root`/bucket/key; opening for append fails, as on GCS."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return (cls.root + "/" + path.removeprefix(prefix)).rstrip("/")
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):
        """'bucket/key' names without the protocol, as gcsfs returns them (epath prepends 'gs://')."""
        return [name.removeprefix(self.root + "/") for name in super().glob(path, **kwargs)]

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "a" in mode:
            raise OSError(f"{path}: an object store cannot append")
        return super()._open(path, mode, block_size, **kwargs)


def use_fake_gcs(store: Path, set_attribute=setattr, set_item=operator.setitem) -> None:
    """Sends gs:// to the folder `store`: epath through fsspec's `gcs` protocol, orbax's TensorStore
    through its GCS kvstore spec (and no bucket-layout query)."""
    set_attribute(FakeGCS, "root", str(store))
    for name in ("gs", "gcs"):
        set_item(fsspec_registry, name, FakeGCS)
    FakeGCS.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    set_attribute(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    set_attribute(gcs_utils, "get_kvstore_for_gcs", lambda path: {
        "driver": "file", "path": str(store / str(path).removeprefix("gs://"))})


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The store's folder; gs:// paths lead there for the test's duration."""
    store = tmp_path / "store"
    store.mkdir()
    use_fake_gcs(store, monkeypatch.setattr, monkeypatch.setitem)
    yield store
    FakeGCS.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert sorted(os.listdir(cwd)) == [], "something was written to the current directory"


def one_device():
    return mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])


def scorer(completions, golds):
    return [float(zlib.crc32(c.encode()) % 2) for c in completions]


def _config():
    c = get_config("tiny")
    c.model.checkpoint = str(ROOT / "assets" / "tiny-r1")  # the run's cwd is an empty folder
    c.steps, c.checkpoint_every, c.eval_every, c.log_every = 4, 2, 2, 100
    c.rl.update(prompts_per_step=2, group_size=4, max_new_tokens=16, micro_batch_size=8)
    c.eval.update(num_problems=2, samples=1)
    return c


class _Crash(RuntimeError):
    pass


class _CrashingTask(grpo.GRPOTask):
    def next_batch(self, step, frozen, adapter):
        if step == 3:
            raise _Crash("killed after the step-2 checkpoint")
        return super().next_batch(step, frozen, adapter)


def _rows(text):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_") and k not in TIMING}
            for line in text.splitlines()]


def _scalars(folder, timing=True):
    """{(tag, step): value} of every TensorBoard event file under `folder` (TFRecord framing); the
    timing scalars too when `timing`."""
    out = {}
    for path in epath.Path(folder).glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if not timing and (value.tag.startswith("time_") or value.tag in TIMING):
                    continue
                out[(value.tag, event.step)] = value.simple_value
    return out


@pytest.mark.slow  # three tiny GRPO runs: 70-160 s on two shared CPU cores
def test_gcs_run_killed_and_resumed_equals_local_run(tmp_path, bucket, empty_cwd, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    c = _config()
    local, remote = tmp_path / "local", "gs://runs/grpo"
    loop.train(grpo.GRPOTask(c, records=RECORDS, scorer=scorer), c, local, mesh=one_device())
    with pytest.raises(_Crash):
        loop.train(_CrashingTask(c, records=RECORDS, scorer=scorer), c, remote, mesh=one_device())
    assert (bucket / "runs/grpo/ckpt/2").is_dir() and not (bucket / "runs/grpo/ckpt/4").exists()
    assert len(_rows((bucket / "runs/grpo/metrics.jsonl").read_text())) == 2
    loop.train(grpo.GRPOTask(c, records=RECORDS, scorer=scorer), c, remote, mesh=one_device())

    expected = _rows((local / "metrics.jsonl").read_text())
    assert len(expected) == 4 and "heldout_accuracy" in expected[1]
    assert _rows(epath.Path(remote, "metrics.jsonl").read_text()) == expected
    final_local, final_remote = checkpoint.read_state(local, 4), checkpoint.read_state(remote, 4)
    jax.tree.map(np.testing.assert_array_equal, final_local, final_remote)
    mid = checkpoint.read_state(local, 2)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final_local["adapter"]),
                                                         jax.tree.leaves(mid["adapter"]))), \
        "the adapter did not change between steps 2 and 4: the test could not detect a bad resume"
    stored = bucket / "runs/grpo"
    assert json.loads((stored / "config.json").read_text()) == json.loads((local / "config.json").read_text())
    assert json.loads((stored / "run.json").read_text())["seed"] == c.seed
    assert _scalars(stored / "tensorboard", timing=False) == _scalars(local / "tensorboard", timing=False)
    assert not list(Path(tempfile.gettempdir()).glob("tensorboard-*")), "the event staging folder was left"


def test_checkpointer_on_a_store_restores_what_it_saved(bucket, empty_cwd):
    state = {"adapter": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, "opt": {"count": np.int32(7)}}
    saver = checkpoint.Checkpointer("gs://runs/c")
    saver.save(2, state, {"position": 5}, {"updates": 2})
    saver.close()
    assert (bucket / "runs/c/ckpt/2/state").is_dir()
    loader = checkpoint.Checkpointer("gs://runs/c")
    assert loader.latest_step() == 2
    zeros = jax.tree.map(jnp.zeros_like, state)
    restored, data_state, meta = loader.restore(2, zeros)
    loader.close()
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert data_state == {"position": 5} and meta == {"updates": 2}
    jax.tree.map(np.testing.assert_array_equal, checkpoint.read_state("gs://runs/c", 2), state)
    with pytest.raises(FileNotFoundError, match="gs://runs/c/ckpt/4/state"):
        checkpoint.read_state("gs://runs/c", 4)


def test_metric_writer_on_a_store_rewrites_and_truncates(bucket, empty_cwd, tmp_path):
    rows = [{"loss": 1.0 / step, "reward": float(step)} for step in range(1, 5)]
    writer = metrics.MetricWriter("gs://runs/m", flush_secs=1e9)
    for step, row in enumerate(rows[:3], 1):
        writer.write(step, row)
    assert not (bucket / "runs/m/metrics.jsonl").exists()  # buffered until a flush
    writer.flush()
    assert len((bucket / "runs/m/metrics.jsonl").read_text().splitlines()) == 3
    writer.close()
    resumed = metrics.MetricWriter("gs://runs/m", flush_secs=1e9)
    resumed.truncate_after(2)
    resumed.write(3, rows[2])
    resumed.write(4, rows[3])
    resumed.close()
    local = metrics.MetricWriter(tmp_path / "m")
    for step, row in enumerate(rows, 1):
        local.write(step, row)
    local.close()
    assert (bucket / "runs/m/metrics.jsonl").read_text() == (tmp_path / "m/metrics.jsonl").read_text()
    assert _scalars(bucket / "runs/m/tensorboard") == _scalars(tmp_path / "m/tensorboard")
    with pytest.raises(OSError, match="cannot append"):
        epath.Path("gs://runs/m/metrics.jsonl").open("a")


def test_only_the_first_host_writes_and_a_different_config_is_refused(bucket, empty_cwd, monkeypatch):
    c = _config()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    metrics.MetricWriter("gs://runs/h", enabled=False).write(1, {"loss": 1.0})
    checkpoint.save_config("gs://runs/h", c)
    assert not (bucket / "runs/h").exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    path = checkpoint.save_config("gs://runs/h", c)
    assert str(path) == "gs://runs/h/config.json" and (bucket / "runs/h/config.json").is_file()
    c.seed += 1
    with pytest.raises(ValueError, match="different config"):
        checkpoint.save_config("gs://runs/h", c)


def test_eval_results_go_to_the_store(bucket, empty_cwd):
    c = eval_math.get_config("tiny")
    c.checkpoint = str(ROOT / "assets" / "tiny-r1")
    c.benchmarks, c.limit, c.k.synthetic, c.batch_size = ("synthetic",), 2, 1, 8
    c.sampling.max_new_tokens, c.reward_workers = 8, 1
    results = math_eval.run(c, output="gs://runs/e/eval_results.json", log=None)
    saved = json.loads((bucket / "runs/e/eval_results.json").read_text())
    assert saved["checkpoint"] == c.checkpoint
    assert saved["processes"] == 1 and saved["devices"] == len(jax.devices())
    assert {k: v for k, v in saved.items() if k not in ("checkpoint", "adapter", "config", "processes", "devices")} == \
        json.loads(json.dumps(results.to_json()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_hosts_share_one_store_workdir(tmp_path):
    store, out, cwd = tmp_path / "store", tmp_path / "out", tmp_path / "cwd"
    for folder in (store, out, cwd):
        folder.mkdir()
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, str(store), str(out), str(p), str(port)], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    for p in procs:
        text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, text[-4000:]
    assert sorted(os.listdir(cwd)) == [], "a host wrote to the current directory"
    for p in (0, 1):
        got = json.loads((out / f"{p}.json").read_text())
        assert got == {"data_state": {"position": p}, "adapter": [0.0, 1.0, 2.0, 3.0], "refused": True}, got
    assert [json.loads(line) for line in (store / "runs/pod/metrics.jsonl").read_text().splitlines()] == \
        [{"step": 1, "loss": 1.0}]  # the first host's line alone
    assert json.loads((store / "runs/pod/config.json").read_text())["seed"] == get_config("tiny").seed
    assert (store / "runs/pod/ckpt/2/state").is_dir()


def _host(store: Path, out: Path, process: int, port: int) -> None:
    """One host of `test_two_hosts_share_one_store_workdir`: config, metrics and a sharded checkpoint
    in gs://runs/pod, then a config that does not match (every host must stop)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
    use_fake_gcs(store)
    c = get_config("tiny")
    checkpoint.save_config("gs://runs/pod", c)
    writer = metrics.MetricWriter("gs://runs/pod", enabled=process == 0)
    writer.write(1, {"loss": float(process + 1)})
    writer.close()
    mesh = mesh_lib.make_mesh(2, 1, 1)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    local = np.arange(2, dtype=np.float32) + 2 * process  # this host's half of [0, 1, 2, 3]
    state = {"adapter": jax.make_array_from_process_local_data(sharding, local)}
    saver = checkpoint.Checkpointer("gs://runs/pod")
    saver.save(2, state, {"position": process}, {"updates": 2})
    saver.close()
    loader = checkpoint.Checkpointer("gs://runs/pod")
    abstract = {"adapter": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}
    restored, data_state, _ = loader.restore(2, abstract)
    loader.close()
    gathered = multihost_utils.process_allgather(restored["adapter"], tiled=True)
    c.seed += 1
    try:
        checkpoint.save_config("gs://runs/pod", c)
        refused = False
    except ValueError:
        refused = True
    (out / f"{process}.json").write_text(json.dumps(
        {"data_state": data_state, "adapter": np.asarray(gathered).tolist(), "refused": refused}))


if __name__ == "__main__":
    _host(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
