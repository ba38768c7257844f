"""avg@k / pass@k on math benchmarks: prints a markdown table, writes per-problem results as JSON.

  python launch/eval.py --config=configs/eval_math.py:tiny --checkpoint=assets/tiny-r1
  python launch/eval.py --config=configs/eval_math.py --checkpoint=PATH --workdir=runs/eval_base
  python launch/eval.py --config=configs/eval_math.py --checkpoint=BASE --adapter=ADAPTER_DIR --config.limit=50

Every host of a pod (or every process of a cluster) runs the same command with --multihost: each samples its
share of every batch on a mesh over all devices, and the first process prints the table and writes the JSON.

  python launch/eval.py --config=configs/eval_math.py --checkpoint=PATH --multihost      # on every host
  python launch/eval.py ... --multihost --coordinator=HOST0:1234 --num_processes=2 --process_id=0   # by hand

--checkpoint is an HF directory (a base or merged model); --adapter an HF PEFT adapter directory.
Results go to WORKDIR/eval_results.json (default workdir: runs/eval); nothing is written to the
current directory. --output=FILE names the JSON file instead ('' : none).
"""

import os
import sys

import jax
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from jaxrl_peft.eval import math_eval

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval_math.py[:tiny]", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (default: config.checkpoint)")
_ADAPTER = flags.DEFINE_string("adapter", None, "HF PEFT adapter directory (default: config.adapter)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/eval", "directory for eval_results.json and the resolved config")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the per-problem results (default: "
                              "WORKDIR/eval_results.json; '' : none)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (every host runs this command)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "with --multihost: HOST:PORT of process 0 (default: "
                                   "detected, as on TPU pods and SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --multihost: number of processes (default: detected)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --multihost: this process's index (default: detected)")


def main(argv) -> None:
    del argv
    c = _CONFIG.value
    if c is None:
        raise app.UsageError("--config=configs/eval_math.py[:tiny] is required")
    if _MULTIHOST.value:
        if os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes gather over gloo
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
        raise app.UsageError("--coordinator, --num_processes and --process_id need --multihost")

    output = _OUTPUT.value
    if output is None:
        output = os.fspath(epath.Path(_WORKDIR.value) / "eval_results.json")
    try:
        results = math_eval.run(c, _CHECKPOINT.value, _ADAPTER.value, output)
    except math_eval.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() != 0:  # every process holds the same results; the first one reports them
        return
    print(results.table())
    if output:
        print(f"\nper-problem results: {output}  ({results.generated_tokens:,} tokens generated in "
              f"{results.seconds:.0f} s)")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
