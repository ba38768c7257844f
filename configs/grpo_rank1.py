"""Rank-1 LoRA: r=1, alpha=2 on all seven projections.

  python launch/train.py --config=configs/grpo_rank1.py --workdir=runs/rank1
  python launch/train.py --config=configs/grpo_rank1.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'lora'
    c.peft.hparams = ml_collections.ConfigDict(dict(r=1, alpha=2, target_modules=ALL_LINEAR))
    return c
