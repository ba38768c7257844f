"""PiSSA: top-r singular triplets, residual base weight, randomized SVD with 4 iterations.

  python launch/train.py --config=configs/grpo_pissa.py --workdir=runs/pissa
  python launch/train.py --config=configs/grpo_pissa.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'pissa'
    c.peft.hparams = ml_collections.ConfigDict(dict(r=32, alpha=64, niter=4, target_modules=ALL_LINEAR))
    return c
