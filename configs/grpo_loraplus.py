"""LoRA+: B matrices at lr x ratio (the study: ratio 2.0).

  python launch/train.py --config=configs/grpo_loraplus.py --workdir=runs/loraplus
  python launch/train.py --config=configs/grpo_loraplus.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'loraplus'
    c.peft.hparams = ml_collections.ConfigDict(dict(r=32, alpha=64, target_modules=ALL_LINEAR))
    return c
