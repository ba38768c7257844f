"""launch/make_tiny_asr.py end to end at toy size: trains, writes an HF Whisper directory, checks it in ModRWKV."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rwkv_jax.encoders import whisper

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_asr", ROOT / "launch" / "make_tiny_asr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the whole asset script at toy size; the shipped asset is tested in test_tiny_asr.py
def test_builds_a_whisper_directory_modrwkv_reads(tmp_path, capsys):
    out = tmp_path / "whisper"
    result = _script().main([f"--out={out}", "--steps=3", "--batch_size=4", "--heldout=8", "--chunk_seconds=2",
                             "--d_model=16", "--layers=1", "--heads=2", "--ffn=32", "--max_digits=4",
                             f"--workdir={tmp_path / 'work'}"])
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert json.loads((out / "preprocessor_config.json").read_text())["chunk_length"] == 2
    encoder, params = whisper.load_whisper(out)
    assert encoder.config.max_source_positions == 100 and encoder.config.d_model == 16
    assert "ModRWKV(" in printed and "reloads bit-exact" in printed
    last = printed.strip().splitlines()[-1]
    assert last == (f"heldout_frame_accuracy before={result['before']['frame_accuracy']:.3f} "
                    f"after={result['after']['frame_accuracy']:.3f}")
    assert (tmp_path / "work" / "pretrain" / "run.json").exists()  # trained by the core
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
