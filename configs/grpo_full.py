"""Full fine-tuning: every weight trains. The study uses a tenth of the PEFT learning rate's scale at
1.5B (1e-6 against LoRA's 1e-5); the embedded default keeps that ratio (1e-4 against its 1e-3).

  python launch/train.py --config=configs/grpo_full.py --workdir=runs/full
  python launch/train.py --config=configs/grpo_full.py:tiny     # embedded default, CPU, minutes
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config  # noqa: F401

FULL_LR_RATIO = 0.1  # full fine-tuning lr / PEFT lr, the study's ratio


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config(arg)
    c.peft.name = 'full'
    c.peft.hparams = ml_collections.ConfigDict()
    c.optim.learning_rate = FULL_LR_RATIO * c.optim.learning_rate if arg == "tiny" else 1e-6
    return c
