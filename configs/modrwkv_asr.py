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
tiny RWKV-7 (assets/tiny-modrwkv/rwkv7); its last line is `heldout_wer before=<x> after=<y>`. The frozen
encoder's features are cached in WORKDIR/features (encoded once, read by both stages). Stage 2 learns the
digits' identity and then their order with plateaus whose length varies with the data order: held-out WER
0.102 / 0.430 / 0.020 for config.seed 0 / 1 / 2 (the stuck run confuses digits of one keypad row).
"""

import ml_collections

from configs import modrwkv


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """configs/modrwkv.py's config with the speech encoder, data, schedule and metric."""
    c = modrwkv.get_config(arg)
    tiny = arg == "tiny"
    c.model.update(encoder="assets/tiny-asr/whisper" if tiny else "openai/whisper-small",
                   rwkv="assets/tiny-modrwkv/rwkv7" if tiny else "checkpoints/rwkv7-0.4b",
                   chat_format="paper",
                   param_dtype="float32")  # the audio encoders compute in their parameter dtype
    c.data.update(format="synthetic_dtmf" if tiny else "librispeech", train="synthetic" if tiny else "",
                  heldout="synthetic" if tiny else "", synthetic_size=4000, heldout_size=100,
                  seq_len=96 if tiny else 1024, max_audio_seconds=4.0 if tiny else 30.0,
                  feature_cache="features" if tiny else "")  # the frozen encoder runs once per clip
    c.train.update(batch_size=16, micro_batch_size=16 if tiny else 8)
    c.stage1 = modrwkv.stage(modrwkv.full(modrwkv.CONNECTOR), 3e-3 if tiny else 1e-4, 150 if tiny else 2000,
                             16, 10 if tiny else 100)
    c.stage2 = modrwkv.stage(modrwkv.full(modrwkv.CONNECTOR + ("llm/*",)), 2e-3 if tiny else 1e-4,
                             1800 if tiny else 8000, 16, 10 if tiny else 100)
    c.stage2.optim.end_learning_rate = 0.0 if tiny else 5e-5
    c.eval.update(metric="asr", examples=100 if tiny else 512, batch_size=50 if tiny else 16,
                  max_new_tokens=16 if tiny else 128)
    c.steps, c.peft, c.optim = c.stage1.steps, c.stage1.peft, c.stage1.optim
    return c
