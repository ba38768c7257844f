"""LoRA-FA: A frozen at init, projected-gradient update of B (Adam eps 1e-6).

  python launch/train.py --config=configs/grpo_lorafa.py --workdir=runs/lorafa
  python launch/train.py --config=configs/grpo_lorafa.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'lorafa'
    c.peft.hparams = ml_collections.ConfigDict(dict(r=32, alpha=64, target_modules=ALL_LINEAR))
    c.optim.eps = 1e-6
    return c
