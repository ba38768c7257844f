"""LayerNorm tuning: every RMSNorm gain trains.

  python launch/train.py --config=configs/grpo_lntuning.py --workdir=runs/lntuning
  python launch/train.py --config=configs/grpo_lntuning.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'ln_tuning'
    c.peft.hparams = ml_collections.ConfigDict()
    return c
