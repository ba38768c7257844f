"""Supervised fine-tuning of an R1-Distill decoder on (prompt, completion) pairs with any PEFT method.

  python launch/train.py --config=configs/sft.py:tiny          # embedded default: CPU, a few minutes
  python launch/train.py --config=configs/sft.py --config.model.checkpoint=PATH \\
      --config.data.train=train.jsonl --config.data.heldout=val.jsonl --workdir=runs/sft

Data: JSONL lines {"prompt": ..., "completion": ...} (the completion gets the stop token), or
'synthetic' (worked R1-style solutions of jaxrl_peft.data.synthetic problems). `:tiny` fine-tunes the
embedded model on worked solutions only (its teacher guessed 60% of the time) with LoRA; the last
line is `heldout_loss before=<x> after=<y>`. launch/make_tiny_model.py trains assets/tiny-r1 through
this task (full fine-tuning from a random init).
"""

import ml_collections

from configs.base_grpo import ALL_LINEAR


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"config argument must be '' or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        checkpoint="assets/tiny-r1" if tiny else "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        revision="",  # of the hub repo when checkpoint is a hub id ('' : main)
        preset="tiny" if tiny else "r1-distill-qwen-1.5b",
        dtype="float32" if tiny else "bfloat16",
        param_dtype="float32" if tiny else "bfloat16",
        remat=not tiny,
    ))
    c.peft = ml_collections.ConfigDict(dict(
        name="lora", hparams=ml_collections.ConfigDict(dict(r=32, alpha=64, target_modules=ALL_LINEAR))))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sft = ml_collections.ConfigDict(dict(
        batch_size=16,  # packed rows per step (global)
        micro_batch_size=16,  # rows per forward/backward (gradient accumulation above it)
        seq_len=256 if tiny else 4096,  # tokens per packed row
    ))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-3 if tiny else 2e-5, schedule="cosine", warmup_steps=10 if tiny else 50,
        end_learning_rate=0.0, weight_decay=0.0, decay="matrices", b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
        loraplus_ratio=16.0))
    c.data = ml_collections.ConfigDict(dict(
        train="synthetic" if tiny else "",  # a JSONL file of {"prompt", "completion"} or 'synthetic'
        heldout="synthetic" if tiny else "",  # '' : no held-out loss
        template="boxed",  # prompt template of synthetic problems
        synthetic_size=4000, heldout_size=64, synthetic_seed=0,
        synthetic_kinds=("percent", "quadratic", "modular", "linear"), synthetic_levels=(1, 2),
    ))
    c.steps = 60 if tiny else 1000
    c.eval_every = 20 if tiny else 200
    c.checkpoint_every = 20 if tiny else 200
    c.log_every = 10 if tiny else 1
    return c
