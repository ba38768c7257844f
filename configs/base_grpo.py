"""GRPO/DAPO on DeepSeek-R1-Distill with a PEFT method: the study's settings (arg '') or the embedded
default (arg 'tiny', a small model from assets/ that runs on CPU in minutes).

  python launch/train.py --config=configs/grpo_dora.py --workdir=runs/dora
  python launch/train.py --config=configs/grpo_dora.py:tiny
  python launch/train.py --config=configs/grpo_lora.py --dry_run

Per-method files (configs/grpo_<method>.py) import this one and set only the `peft` block.
"""

import ml_collections

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"config argument must be '' (the paper's setting) or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    c = ml_collections.ConfigDict()
    c.task = "grpo"  # launch/train.py runs jaxrl_peft.rl.grpo.GRPOTask on the training core
    c.seed = 42

    # A local HF directory (config.json + safetensors + tokenizer) or a hub id (fetched into the HF cache:
    # only config, tokenizer and safetensors files; HF_HOME and HF_HUB_OFFLINE are honoured).
    c.model = ml_collections.ConfigDict(dict(
        checkpoint="assets/tiny-r1" if tiny else "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        revision="",  # a branch, tag or commit of the hub repo ('' : main); recorded in run.json
        preset="tiny" if tiny else "r1-distill-qwen-1.5b",  # shapes for --dry_run without weights
        dtype="float32" if tiny else "bfloat16",  # compute dtype
        param_dtype="float32" if tiny else "bfloat16",  # frozen base weights
        remat=not tiny,  # gradient checkpointing (the study: on)
    ))

    # The PEFT method: `name` and its hyperparameters (`hparams`), set by configs/grpo_<method>.py.
    c.peft = ml_collections.ConfigDict(dict(
        name="lora",
        hparams=ml_collections.ConfigDict(dict(r=32, alpha=64, target_modules=ALL_LINEAR)),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.rl = ml_collections.ConfigDict(dict(
        loss="dapo",  # aggregation: 'grpo' (sequence mean) | 'dapo' (token mean over the batch) | 'dr_grpo'
        objective="clip",  # 'clip' (PPO-style clipped surrogate) | 'cispo' (-sg(min(ratio, cispo_cap)) A log p)
        cispo_cap=5.0,  # CISPO only: cap of its stop-gradient importance weight (TRL's recommended 5)
        importance_sampling_level="token",  # 'token' | 'sequence' (GSPO: exp of the mean token log-ratio)
        group_size=8,  # completions per prompt (>= 2)
        prompts_per_step=32 if tiny else 16,
        epsilon_low=0.2,
        epsilon_high=0.28,
        delta=0.0,  # two-sided clipping: cap of the ratio in the unclipped term (TRL's delta; > 1+epsilon_high; 0: off)
        kl_coef=0.0,  # no reference model, no KL (the study)
        kl_estimator="k3",  # 'k1' | 'k3' | 'k3_corrected' (k3 times the ratio: TRL 1.16's default)
        scale_rewards="group",  # advantage / std of the 'group' | the whole 'batch' (all hosts) | 'none' (Dr. GRPO)
        mask_truncated_completions=False,  # completions cut at max_new_tokens leave the loss (DAPO)
        dynamic_sampling=False,  # DAPO: drop all-equal groups and sample more prompts to refill the step
        max_sampling_rounds=3,  # dynamic sampling: extra rounds at most; at the cap the step trains on what it has
        overlong_buffer=0,  # soft overlong penalty window in tokens (0: off)
        overlong_penalty=1.0,
        tis_cap=2.0,  # sampler/learner importance weight cap (0: off)
        tis_floor=0.0,  # ... and floor (0: none)
        tis_mode="token_truncate",  # weight per 'token' or per 'sequence', '_truncate' to [floor, cap] or '_mask'
        updates_per_batch=1,
        micro_batch_size=128 if tiny else 8,  # sequences per forward/backward (gradient accumulation)
        max_prompt_tokens=512,
        max_new_tokens=64 if tiny else 16384,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-3 if tiny else 1e-5,
        schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=1.0,
        decay="all",  # 'all' or 'matrices' (no weight decay on gains and biases)
        end_learning_rate=0.0,  # where the cosine schedule ends
        loraplus_ratio=2.0,  # LoRA+ only: lr of the B group = ratio x lr (the study: 2.0)
    ))

    c.data = ml_collections.ConfigDict(dict(
        # 'synthetic', a local .parquet/.json/.jsonl file, or a hub dataset id `org/name[:config]`
        train="synthetic" if tiny else "open-r1/DAPO-Math-17k-Processed:all",
        revision="",  # of the hub dataset ('' : main)
        problem_field="prompt",
        answer_field="solution",
        template="boxed" if tiny else "dapo",  # 'dapo' ("Answer:" instruction) or 'boxed'
        shuffle=True,
        # data.train == 'synthetic': problems from jaxrl_peft.data.synthetic (the kinds and levels the
        # embedded model was fine-tuned on; seed 0 was its SFT data)
        synthetic_size=100_000,
        synthetic_seed=2,
        synthetic_kinds=("percent", "quadratic", "modular", "linear"),
        synthetic_levels=(1, 2),
    ))

    # Held-out accuracy before, during (every eval_every steps) and after training.
    c.eval = ml_collections.ConfigDict(dict(
        heldout="synthetic" if tiny else "math500",  # 'synthetic' or a benchmark name
        num_problems=128 if tiny else 100,
        samples=4 if tiny else 1,
        batch_size=256 if tiny else 64,
    ))
    c.reward_workers = 2

    c.steps = 60 if tiny else 1024
    c.eval_every = 20 if tiny else 64
    c.checkpoint_every = 20 if tiny else 64
    c.log_every = 1
    return c
