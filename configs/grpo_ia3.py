"""(IA)^3 on k, v and the input of the FFN down projection.

  python launch/train.py --config=configs/grpo_ia3.py --workdir=runs/ia3
  python launch/train.py --config=configs/grpo_ia3.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'ia3'
    c.peft.hparams = ml_collections.ConfigDict(dict(target_modules=('k_proj', 'v_proj', 'down_proj'), feedforward_modules=('down_proj',)))
    return c
