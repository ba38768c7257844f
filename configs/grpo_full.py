"""Full fine-tuning: every weight trains (lr 1e-6 at 1.5B, as in the study).

  python launch/train.py --config=configs/grpo_full.py --workdir=runs/full
  python launch/train.py --config=configs/grpo_full.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'full'
    c.peft.hparams = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    return c
