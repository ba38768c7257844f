"""Math benchmark evaluation: the study's protocol (arg '') or a small CPU run on the embedded default
(arg 'tiny': assets/tiny-r1 on held-out synthetic problems and a few MATH-500 problems).

  python launch/eval.py --config=configs/eval_math.py --checkpoint=PATH [--adapter=PATH] --output=results.json
  python launch/eval.py --config=configs/eval_math.py:tiny --checkpoint=assets/tiny-r1
  python launch/eval.py --config=configs/eval_math.py --checkpoint=PATH --config.benchmarks=math500,aime24 \
      --config.limit=50 --config.k.aime24=8

The protocol (reference doc section 5): one user message with the DAPO "Answer:" instruction (template
'dapo', no system prompt), temperature 0.7, top-p 0.9, up to 31744 new tokens (a 32768-token context
with prompts up to 1024 tokens), seed 42; k = 32 for AIME24/AIME25/AMC and 4 for the other sets.
"""

import ml_collections

from configs import base_grpo

STUDY_BENCHMARKS = ("aime24", "aime25", "amc", "math500", "minerva", "olympiad")
STUDY_K = dict(aime24=32, aime25=32, amc=32, math500=4, minerva=4, olympiad=4)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"config argument must be '' (the study's protocol) or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    train = base_grpo.get_config(arg)
    c = ml_collections.ConfigDict()
    c.seed = 42
    # An HF directory (base or merged); --checkpoint overrides. An HF PEFT adapter dir on top: --adapter.
    c.checkpoint = "assets/tiny-r1" if tiny else ""
    c.adapter = ""
    c.model = ml_collections.ConfigDict(dict(
        dtype="float32" if tiny else "bfloat16",  # compute dtype
        param_dtype="float32" if tiny else "bfloat16",
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # used with more than one device

    # Names from jaxrl_peft.data.loaders.BENCHMARKS, 'synthetic', or .json/.jsonl/.parquet paths.
    c.benchmarks = ("synthetic", "math500") if tiny else STUDY_BENCHMARKS
    c.k = ml_collections.ConfigDict(dict(synthetic=8, math500=4) if tiny else STUDY_K)
    c.default_k = 4  # for benchmarks not listed in `k` (files)
    c.limit = 16 if tiny else 0  # first `limit` problems of each benchmark (0: all)
    c.data_dir = ""  # the benchmark files' directory (default: the repo's data/benchmarks)
    # The tiny GRPO run's held-out stream (jaxrl_peft.rl.grpo.heldout_records).
    c.synthetic = ml_collections.ConfigDict(dict(
        num_problems=64, seed=train.data.synthetic_seed + 1_000_003,
        kinds=tuple(train.data.synthetic_kinds), levels=tuple(train.data.synthetic_levels),
    ))

    c.template = train.data.template if tiny else "dapo"
    c.sampling = ml_collections.ConfigDict(dict(
        temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=128 if tiny else 31744))
    c.max_prompt_tokens = 512 if tiny else 1024  # longer prompts are cut from the left (counted)
    c.prompt_bucket = 128  # prompts are left-padded to a multiple of this (one compilation per width)
    # Rows (samples) per sampler call. The KV cache holds batch x (prompt + new) tokens: for the 1.5B model
    # 28 KiB a token, so 64 rows x 32768 tokens = 57 GiB (an 80 GB GPU); lower it for 7B.
    c.batch_size = 32 if tiny else 64
    c.reward_workers = 2
    c.save_completions = False  # also write every completion's text to the JSON
    return c
