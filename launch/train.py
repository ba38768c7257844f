"""One entry point for every training config; `config.task` names the task (grpo, sft, modrwkv).

  python launch/train.py --config=configs/grpo_dora.py:tiny
  python launch/train.py --config=configs/grpo_dora.py --workdir=runs/dora --config.optim.learning_rate=2e-5
  python launch/train.py --config=configs/grpo_lora.py --dry_run --chips=4
  python launch/train.py --config=configs/modrwkv.py:tiny          # ModRWKV: stage 1, then stage 2
  launch/tpu_pod.sh NAME ZONE configs/grpo_dora.py gs://BUCKET/runs/dora     # every host of a TPU pod
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxrl_peft.models import hub
from jaxrl_peft.models.safetensors_io import CheckpointError
from jaxrl_peft.rl import grpo
from jaxrl_peft.train import loop, memory, sft
from rwkv_jax import modrwkv_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: a local path or an object store such as "
                                "gs://BUCKET/runs/NAME (resolved config, run record, metrics, TensorBoard, "
                                "checkpoints); default runs/<peft.name>")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build abstractly: print parameter counts and memory per chip")
_CHIPS = flags.DEFINE_integer("chips", None, "devices to estimate memory for (default: this host's)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (every host of a pod)")

TASKS = {"grpo": grpo.GRPOTask, "sft": sft.SFTTask, "modrwkv": modrwkv_task.ModRWKVTask}


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
    c = _CONFIG.value
    if c is None:
        raise app.UsageError("--config=configs/<file>.py[:tiny] is required")
    if c.get("task", "grpo") not in TASKS:
        raise app.UsageError(f"config.task={c.task!r}: expected one of {sorted(TASKS)}")
    if _MULTIHOST.value:
        jax.distributed.initialize()
    try:
        if c.get("task", "grpo") == "modrwkv":  # its stages, each a run of the task on the training core
            if _DRY_RUN.value:
                raise loop.ConfigError("--dry_run estimates the decoder's memory; it does not cover ModRWKV yet")
            modrwkv_task.train_stages(c, _WORKDIR.value or "runs/modrwkv")
            return
        task = TASKS[c.get("task", "grpo")](c)
        if _DRY_RUN.value:
            for line in memory.estimate(c, _CHIPS.value).lines():
                print(line)
            print(f"state_bytes_per_device={memory.state_bytes_per_device(c)}")
            return
        loop.train(task, c, _WORKDIR.value or f"runs/{c.peft.name}")
    except (loop.ConfigError, CheckpointError, hub.HubError, FileNotFoundError) as e:  # bad input, named
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
