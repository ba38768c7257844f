"""Several hosts: two JAX processes x 2 CPU devices run the same RL steps as one process x 4 devices.

Each process feeds only its own prompts (as every host of a pod does); the sampled completions, the
rewards, the metrics and the updated adapter must be those of the single process that holds the whole
batch. Run as a script, this file is one worker.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
PROMPTS, GROUP = 4, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out: Path, processes: int, devices: int) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return [subprocess.Popen([sys.executable, __file__, str(out), str(p), str(processes), str(port)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for p in range(processes)]


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, text[-4000:]


def test_two_hosts_equal_one(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = _launch(multi, processes=2, devices=2)
    _wait(_launch(single, processes=1, devices=4))
    _wait(procs)
    a = json.loads((single / "0.json").read_text())
    for p in (0, 1):
        b = json.loads((multi / f"{p}.json").read_text())
        assert b["hosts"] == [{"process": 0}, {"process": 1}]  # per-host data state, gathered
        for step in (0, 1):
            ma, mb = a["metrics"][step], b["metrics"][step]
            for k in ("reward", "accuracy", "response_length", "truncation_rate", "kept_fraction"):
                assert ma[k] == mb[k], (step, k, ma[k], mb[k])
            for k in ("loss", "grad_norm", "entropy"):
                np.testing.assert_allclose(mb[k], ma[k], rtol=1e-4, atol=1e-6, err_msg=f"step {step} {k}")
        assert 0 <= b["heldout"] <= 1
    assert 0 < a["metrics"][0]["accuracy"] < 1 and a["metrics"][0]["grad_norm"] > 0  # a real update happened
    wa, w0, w1 = (np.load(d / f"{p}.npz") for d, p in ((single, 0), (multi, 0), (multi, 1)))
    moved = 0.0
    for k in wa.files:
        np.testing.assert_array_equal(w0[k], w1[k])  # the hosts agree
        # Adam divides by sqrt(v): where a gradient is ~0, summation order alone can move an entry by a
        # fraction of lr (1e-3); everywhere else the two runs agree to float rounding.
        np.testing.assert_allclose(w0[k], wa[k], atol=1e-4, err_msg=k)
        assert np.median(np.abs(w0[k] - wa[k])) < 1e-7, k
        moved = max(moved, float(np.abs(wa[k] - np.load(single / "init.npz")[k]).max()))
    assert moved > 1e-4


def _worker(out: Path, process: int, processes: int, port: int) -> None:
    import jax

    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=processes, process_id=process)
    sys.path.insert(0, str(ROOT))
    from configs.grpo_dora import get_config
    from jaxrl_peft.data import synthetic
    from jaxrl_peft.infra import mesh as mesh_lib
    from jaxrl_peft.rl import grpo
    from jaxrl_peft.train import loop

    c = get_config("tiny")
    c.rl.update(group_size=GROUP, prompts_per_step=PROMPTS, micro_batch_size=8, max_new_tokens=40)
    c.eval.batch_size = 8
    c.reward_workers = 1
    # The cross-process all-reduce sums device gradients in another order than one process does; Adam's
    # m / (sqrt(v) + eps) turns those last-bit differences into visible moves where v is ~0. eps 1e-6
    # (PEFT's LoRA-FA default) bounds that amplification; every comparison below is unchanged.
    c.optim.eps = 1e-6
    task = grpo.GRPOTask(c)
    run = loop.build(task, c)
    assert len(run.mesh.devices.flat) == 4
    from jax.experimental import multihost_utils

    leaves = lambda: {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(v, tiled=True))  # noqa: E731
                      for k, v in jax.tree_util.tree_leaves_with_path(run.state.adapter)}
    out.mkdir(parents=True, exist_ok=True)
    init = leaves()  # a collective: every host calls it
    if process == 0:
        np.savez(out / "init.npz", **init)
    records = synthetic.generate(2 * PROMPTS, seed=11, kinds=("percent", "quadratic"), levels=(1,))
    metrics = []
    for step in range(2):
        batch = records[step * PROMPTS:(step + 1) * PROMPTS]
        share = len(batch) // processes
        mine = batch[process * share:(process + 1) * share]  # this host's prompts, whole groups
        problems = [r.problem for r in mine for _ in range(GROUP)]
        golds = [r.answer for r in mine for _ in range(GROUP)]
        rows, totals, m = task.experience(run.frozen, run.state.adapter, problems, golds, jax.random.key(100 + step))
        m.update(run.update(rows, totals))
        metrics.append(m)
    heldout = task.evaluate_records(run.frozen, run.state.adapter, [r.as_record() for r in records[:3]], samples=2,
                                    seed=5)
    hosts = mesh_lib.gather_json({"process": process})
    task.close()
    np.savez(out / f"{process}.npz", **leaves())
    (out / f"{process}.json").write_text(json.dumps({"metrics": metrics, "heldout": heldout, "hosts": hosts}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
