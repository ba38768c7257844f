"""launch/eval.py --multihost: two CPU JAX processes (1 device each) give the table and the per-problem
results of one process holding both devices (same mesh, each process samples its half of every batch)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config=configs/eval_math.py:tiny", "--config.benchmarks=('synthetic',)", "--config.limit=6",
        "--config.k.synthetic=2", "--config.sampling.max_new_tokens=48", "--config.batch_size=4",
        "--config.reward_workers=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _eval(out: Path, processes: int, devices: int) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = _free_port()
    procs = []
    for p in range(processes):
        extra = (["--multihost", f"--coordinator=localhost:{port}", f"--num_processes={processes}",
                  f"--process_id={p}"] if processes > 1 else [])
        procs.append(subprocess.Popen([sys.executable, "launch/eval.py", *ARGS, *extra, f"--output={out}"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-4000:]
        outs.append(stdout)
    return outs


def test_two_processes_equal_one(tmp_path):
    multi = _eval(tmp_path / "multi.json", processes=2, devices=1)
    single_out = _wait(_eval(tmp_path / "single.json", processes=1, devices=2))[0]
    multi_out = _wait(multi)
    table = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
    assert table(single_out) and table(multi_out[0]) == table(single_out)
    assert table(multi_out[1]) == []  # only the first process reports
    single = json.loads((tmp_path / "single.json").read_text())
    both = json.loads((tmp_path / "multi.json").read_text())
    assert (single["processes"], single["devices"], both["processes"], both["devices"]) == (1, 2, 2, 2)
    assert single["summary"] == both["summary"]
    a, b = single["problems"]["synthetic"], both["problems"]["synthetic"]
    assert len(a) == 6 and all(len(p["correct"]) == 2 for p in a)
    for pa, pb in zip(a, b):
        for key in ("correct", "answers", "lengths", "finished"):
            assert pa[key] == pb[key], (pa["index"], key)
    assert len({tuple(p["lengths"]) for p in a}) > 1  # the samples are not all alike
