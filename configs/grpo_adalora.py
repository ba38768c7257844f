"""AdaLoRA: init rank 32 pruned to 8 by the cubic budget schedule over the run.

`total_step` follows `steps` (a derived reference), so `--config.steps=N` also sets the budget schedule's
length; `--config.peft.hparams.total_step=M` still sets it on its own.

  python launch/train.py --config=configs/grpo_adalora.py --workdir=runs/adalora
  python launch/train.py --config=configs/grpo_adalora.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'adalora'
    c.peft.hparams = ml_collections.ConfigDict(dict(init_r=32, target_r=8, alpha=64, total_step=c.get_ref("steps") + 0, target_modules=ALL_LINEAR))
    return c
