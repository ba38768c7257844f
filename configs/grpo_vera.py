"""VeRA r=32: shared frozen projections, trainable scaling vectors.

  python launch/train.py --config=configs/grpo_vera.py --workdir=runs/vera
  python launch/train.py --config=configs/grpo_vera.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'vera'
    c.peft.hparams = ml_collections.ConfigDict(dict(r=32, target_modules=ALL_LINEAR))
    return c
