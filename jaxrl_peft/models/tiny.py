"""Tiny R1-style tokenizers and checkpoints, in the real HF formats, for tests and the embedded default."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import jax

from jaxrl_peft.models import hf, transformer as tfm
from jaxrl_peft.models.hf import R1_DISTILL_CHAT_TEMPLATE

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
R1_SPECIAL = [EOS, BOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜pad｜>"]


def build_r1_tokenizer(path: str | os.PathLike, texts: Iterable[str], vocab_size: int = 512) -> Path:
    """Trains a byte-level BPE on `texts` with the R1-Distill special tokens and chat template.

    Writes tokenizer.json and tokenizer_config.json into `path` (the layout of the real checkpoints).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=R1_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": 16384, "tokenizer_class": "LlamaTokenizerFast", "padding_side": "left",
        "chat_template": R1_DISTILL_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return path


def make_tiny_checkpoint(path: str | os.PathLike, texts: Iterable[str], seed: int = 0,
                         vocab_size: int = 512, **overrides) -> Path:
    """A complete tiny R1-style HF checkpoint (config.json, model.safetensors, tokenizer files).

    Weights are random; `overrides` change the `tiny` preset's shape.
    """
    path = build_r1_tokenizer(path, texts, vocab_size)
    tok = hf.Tokenizer(path)
    cfg = tfm.preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     **overrides)
    hf.save(path, tfm.Transformer(cfg), tfm.init_params(cfg, jax.random.key(seed)))
    return path
