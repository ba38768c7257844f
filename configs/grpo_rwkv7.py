"""GRPO/DAPO on RWKV-7 with any of the 14 PEFT methods; the method is the config argument.

  python launch/train.py --config=configs/grpo_rwkv7.py:tiny          # LoRA r32/alpha64, assets/tiny-rwkv7, CPU
  python launch/train.py --config=configs/grpo_rwkv7.py:dora,tiny
  python launch/train.py --config=configs/grpo_rwkv7.py:vera --config.model.checkpoint=DIR --workdir=runs/rwkv7-vera

The argument is `[method][,tiny]` (method default 'lora'; one of METHODS). Everything but the model and
the PEFT block is configs/base_grpo.py's; `PEFT_DEFAULTS` is the per-family table of each method's targets
and hyperparameters (the decoder's projections are q_proj ... down_proj, RWKV-7's att/receptance ...
ffn/value). The full-size setting expects an RWKV-7 checkpoint directory written by
`rwkv_jax.model.convert_pth_to_safetensors` with HF tokenizer files beside it.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs.base_grpo import ALL_LINEAR, get_config as base_config
from rwkv_jax.model import LINEAR_MODULES

# Every method a config can name: (peft method name, hyperparameters without targets).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", dict(r=32, alpha=64)),
    "rank1": ("lora", dict(r=1, alpha=2)),
    "rslora": ("rslora", dict(r=32, alpha=64)),
    "dora": ("dora", dict(r=32, alpha=64)),
    "pissa": ("pissa", dict(r=32, alpha=64, niter=4)),
    "milora": ("milora", dict(r=32, alpha=64)),
    "loraplus": ("loraplus", dict(r=32, alpha=64)),
    "lorafa": ("lorafa", dict(r=32, alpha=64)),
    "adalora": ("adalora", dict(init_r=32, target_r=8, alpha=64)),
    "miss": ("miss", dict(r=64)),
    "vera": ("vera", dict(r=32)),
    "ia3": ("ia3", {}),
    "lntuning": ("ln_tuning", {}),
    "full": ("full", {}),
}
# Per family: the projections the linear methods target, (IA)^3's targets and input-scaled modules, and
# the norms LayerNorm tuning trains.
PEFT_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {
    "decoder": dict(targets=ALL_LINEAR, ia3_targets=("k_proj", "v_proj", "down_proj"),
                    ia3_feedforward=("down_proj",), norms=("input_layernorm", "post_attention_layernorm", "norm")),
    "rwkv7": dict(targets=LINEAR_MODULES, ia3_targets=("att/key", "att/value", "ffn/value"),
                  ia3_feedforward=("ffn/value",), norms=("ln0", "ln1", "ln2", "ln_x", "ln_out")),
}
TINY_CHECKPOINT = "assets/tiny-rwkv7"
FULL_CHECKPOINT = "checkpoints/rwkv7-g1-1.5b"  # convert_pth_to_safetensors output + tokenizer files


def peft_block(method: str, family: str, steps: Any) -> ml_collections.ConfigDict:
    """The `peft` block of `method` (a METHODS key) for a family (a PEFT_DEFAULTS key); `steps` is the run's
    step count or a reference to it (AdaLoRA's budget schedule spans the run)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    name, hparams = METHODS[method]
    hparams = dict(hparams)
    defaults = PEFT_DEFAULTS[family]
    if name == "ia3":
        hparams.update(target_modules=defaults["ia3_targets"], feedforward_modules=defaults["ia3_feedforward"])
    elif name == "ln_tuning":
        hparams["target_modules"] = defaults["norms"]
    elif name != "full":
        hparams["target_modules"] = defaults["targets"]
    if name == "adalora":
        hparams["total_step"] = steps
    return ml_collections.ConfigDict(dict(name=name, hparams=ml_collections.ConfigDict(hparams)))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    parts = [p for p in arg.split(",") if p]
    tiny = "tiny" in parts
    methods = [p for p in parts if p != "tiny"]
    if len(methods) > 1:
        raise ValueError(f"config argument {arg!r}: expected '[method][,tiny]', got several methods {methods}")
    method = methods[0] if methods else "lora"
    c = base_config("tiny" if tiny else "")
    c.model.checkpoint = TINY_CHECKPOINT if tiny else FULL_CHECKPOINT
    c.model.preset = ""  # no preset shapes: --dry_run needs the checkpoint's config.json
    c.peft = peft_block(method, "rwkv7", c.get_ref("steps") + 0)  # follows --config.steps
    if method == "full":
        c.optim.learning_rate = 1e-5 if tiny else 1e-6
    if method == "lorafa":
        c.optim.eps = 1e-6
    return c
