"""DoRA r=32, alpha=64 on all seven projections (the study's best method).

  python launch/train.py --config=configs/grpo_dora.py --workdir=runs/dora
  python launch/train.py --config=configs/grpo_dora.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'dora'
    c.peft.hparams = ml_collections.ConfigDict(dict(r=32, alpha=64, target_modules=ALL_LINEAR))
    return c
