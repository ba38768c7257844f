"""ModRWKV visual instruction tuning: stage 1 trains the connector, stage 2 the connector and RWKV-7.

  python launch/train.py --config=configs/modrwkv.py:tiny                 # embedded default, CPU
  python launch/train.py --config=configs/modrwkv.py --workdir=runs/modrwkv \\
      --config.model.rwkv=checkpoints/rwkv7-g1-1.5b \\
      --config.data.train=data/llava/blip_laion_cc_sbu_558k.json --config.data.image_folder=data/llava/images
  python launch/train.py --config=configs/modrwkv.py --config.stages='("stage2",)' --config.model.init=DIR \\
      --config.data.train=data/llava/llava_v1_5_mix665k.json                 # stage 2 alone, from a stage-1 model

The default is the reference recipe (JL-er/WorldRWKV; ../shared/reference/rwkv7_modrwkv.md §1.6):
SigLIP2-base-p16-384 + an RWKV-7 checkpoint (rwkv_jax.model.convert_pth_to_safetensors output with HF
tokenizer files beside it, or none: the World tokenizer), the later chat format (placeholders), stage 1
lr 1e-3 batch 256 on LLaVA-558K, stage 2 lr 2e-5 batch 128 on LLaVA-665K, context 2048, Adam
beta 0.9/0.99, eps 1e-8, no weight decay, gradient clip 1.0, bf16, 100 warmup steps then cosine to 0
(what the reference code calls "wsd"; `--config.stage1.optim.schedule=wsd` is the true
warmup-stable-decay of the paper's Table 9). Stage 2 trains RWKV-7 fully; `--config.stage2.peft` can
give it any PEFT method (peft.name='parts': {'adapter': full, 'llm': lora ...}).

`:tiny` runs both stages on the embedded assets (assets/tiny-modrwkv: a tiny SigLIP-style encoder
pretrained on the images' attributes and a tiny RWKV-7 pretrained on text only) with procedurally drawn
images and questions whose answers are equally likely without the image. Its last line is
`heldout_accuracy before=<x> after=<y> shuffled=<z>` (exact match on held-out images; shuffled: the
images permuted across questions, the proof that the model looks).
"""

import ml_collections

from jaxrl_peft.train import optimizer

CONNECTOR = ("adapter/*", "compressor/*")


def full(targets) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="full", hparams=ml_collections.ConfigDict(
        dict(target_modules=tuple(targets)))))


def stage(peft: ml_collections.ConfigDict, learning_rate: float, steps: int, batch_size: int, warmup: int
          ) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        peft=peft, steps=steps, train=ml_collections.ConfigDict(dict(batch_size=batch_size)),
        optim=optimizer.config(learning_rate=learning_rate, schedule="cosine", warmup_steps=warmup, b1=0.9,
                               b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0)))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"config argument must be '' or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    c = ml_collections.ConfigDict()
    c.task = "modrwkv"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        encoder="assets/tiny-modrwkv/siglip" if tiny else "google/siglip2-base-patch16-384",
        rwkv="assets/tiny-modrwkv/rwkv7" if tiny else "checkpoints/rwkv7-g1-1.5b",
        init="",  # a ModRWKV directory to start from instead of encoder + rwkv (e.g. a stage-1 model)
        compress=False,  # the Conv1d compressor before the adapter (576 -> 287 tokens)
        adapter_ratio=0,  # adapter hidden width / LM width (0: the reference's 4)
        chat_format="paper" if tiny else "later",
        dtype="float32" if tiny else "bfloat16",
        param_dtype="float32" if tiny else "bfloat16",
        remat=not tiny,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.data = ml_collections.ConfigDict(dict(
        format="synthetic_shapes" if tiny else "llava",
        train="synthetic" if tiny else "",  # LLaVA JSON / JSONL
        heldout="synthetic" if tiny else "",
        image_folder="", audio_folder="", instruction="",
        synthetic_size=6000, heldout_size=200, synthetic_seed=0, image_size=32,
        seq_len=64 if tiny else 2048,
        max_audio_seconds=30.0,
        truncate=False,
        num_workers=0 if tiny else 8,
        # A directory of the frozen encoder's features, filled before training (each item encoded once, not
        # once per epoch; relative paths are under the run's workdir); '' = off. Keyed by the encoder's
        # weights and the preprocessing; refused for a stage whose PEFT method trains the encoder.
        feature_cache="",
    ))
    c.train = ml_collections.ConfigDict(dict(batch_size=32 if tiny else 256, micro_batch_size=32 if tiny else 8))
    c.stage1 = stage(full(CONNECTOR), 3e-3 if tiny else 1e-3, 150 if tiny else 2181, 32 if tiny else 256,
                     10 if tiny else 100)
    c.stage2 = stage(full(CONNECTOR + ("llm/*",)), 1e-3 if tiny else 2e-5, 150 if tiny else 5197,
                     32 if tiny else 128, 10 if tiny else 100)
    c.stages = ("stage1", "stage2")
    c.eval = ml_collections.ConfigDict(dict(
        metric="qa" if tiny else "loss", examples=200 if tiny else 512, batch_size=100 if tiny else 16,
        max_new_tokens=6 if tiny else 64))
    c.steps = c.stage1.steps  # the loop reads these per stage; kept here for tools that read the top level
    c.peft = c.stage1.peft
    c.optim = c.stage1.optim
    c.eval_every = 0
    c.checkpoint_every = 50 if tiny else 500
    c.log_every = 10 if tiny else 1
    return c
