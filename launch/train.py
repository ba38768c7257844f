"""One entry point for every training config.

  python launch/train.py --config=configs/grpo_dora.py:tiny
  python launch/train.py --config=configs/grpo_dora.py --workdir=runs/dora --config.optim.learning_rate=2e-5
  python launch/train.py --config=configs/grpo_lora.py --dry_run --chips=4
  launch/tpu_pod.sh NAME ZONE configs/grpo_dora.py gs://BUCKET/runs/dora     # every host of a TPU pod
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (resolved config, metrics, checkpoints)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build abstractly: print parameter counts and memory per chip")
_CHIPS = flags.DEFINE_integer("chips", None, "devices to estimate memory for (default: this host's)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (every host of a pod)")


def main(argv) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
    c = _CONFIG.value
    if c is None:
        raise app.UsageError("--config=configs/<file>.py[:tiny] is required")
    if _MULTIHOST.value:
        import jax
        jax.distributed.initialize()
    if _DRY_RUN.value:
        from jaxrl_peft.infra import memory
        for line in memory.estimate(c, _CHIPS.value).lines():
            print(line)
        return
    from jaxrl_peft.rl import learner
    learner.train(c, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
