"""ModRWKV speech recognition: stage 1 trains the audio adapter, stage 2 the adapter and RWKV-7.

  python launch/train.py --config=configs/modrwkv_asr.py:tiny             # embedded default, CPU
  python launch/train.py --config=configs/modrwkv_asr.py --workdir=runs/asr \\
      --config.data.train=LibriSpeech/train-clean-100 --config.data.heldout=LibriSpeech/dev-clean

The default is the reference's ASR recipe (../shared/reference/rwkv7_modrwkv.md §1.5-1.6; JL-er/WorldRWKV
scripts/asr.sh): Whisper-small's encoder (`--config.model.encoder=microsoft/wavlm-large` for WavLM) and
an RWKV-7 checkpoint, the audio prepended and the transcript as the assistant turn
`\\x16Assistant: {text}\\x17` with no user prompt, lr 1e-4 (stage 2 decaying to 5e-5), batch 32 (16 with
Whisper, as the reference runs it), Adam 0.9/0.99, eps 1e-8, clip 1.0, bf16; held-out word error rate.

`:tiny` runs both stages on synthetic DTMF digit strings (tone pairs with noise and varied timing)
through the embedded tiny Whisper-style encoder (assets/tiny-asr, 4-second window) and the embedded
tiny RWKV-7 (assets/tiny-modrwkv/rwkv7); its last line is `heldout_wer before=<x> after=<y>`.
"""

import ml_collections

from configs.modrwkv import CONNECTOR, full, stage


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"config argument must be '' or 'tiny', got {arg!r}")
    tiny = arg == "tiny"
    c = ml_collections.ConfigDict()
    c.task = "modrwkv"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        encoder="assets/tiny-asr/whisper" if tiny else "openai/whisper-small",
        rwkv="assets/tiny-modrwkv/rwkv7" if tiny else "checkpoints/rwkv7-0.4b",
        init="", compress=False, adapter_ratio=0, chat_format="paper",
        dtype="float32" if tiny else "bfloat16",
        param_dtype="float32",  # the audio encoders compute in their parameter dtype
        remat=not tiny,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.data = ml_collections.ConfigDict(dict(
        format="synthetic_dtmf" if tiny else "librispeech",
        train="synthetic" if tiny else "",
        heldout="synthetic" if tiny else "",
        image_folder="", audio_folder="",
        instruction="",  # '' : the reference's prompt-free ASR turn
        synthetic_size=4000, heldout_size=100, synthetic_seed=0, image_size=32,
        seq_len=96 if tiny else 1024,
        max_audio_seconds=4.0 if tiny else 30.0,
        truncate=False,
        num_workers=0 if tiny else 8,
    ))
    c.train = ml_collections.ConfigDict(dict(batch_size=32 if tiny else 16, micro_batch_size=32 if tiny else 8))
    c.stage1 = stage(full(CONNECTOR), 3e-3 if tiny else 1e-4, 150 if tiny else 2000, 32 if tiny else 16,
                     10 if tiny else 100)
    c.stage2 = stage(full(CONNECTOR + ("llm/*",)), 3e-3 if tiny else 1e-4, 900 if tiny else 8000,
                     32 if tiny else 16, 10 if tiny else 100)
    c.stage2.optim.end_learning_rate = 0.0 if tiny else 5e-5
    c.stages = ("stage1", "stage2")
    c.eval = ml_collections.ConfigDict(dict(metric="asr", examples=100 if tiny else 512,
                                            batch_size=50 if tiny else 16, max_new_tokens=16 if tiny else 128))
    c.steps = c.stage1.steps
    c.peft = c.stage1.peft
    c.optim = c.stage1.optim
    c.eval_every = 0
    c.checkpoint_every = 50 if tiny else 500
    c.log_every = 10 if tiny else 1
    return c
