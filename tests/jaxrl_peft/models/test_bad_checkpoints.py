"""Broken checkpoints as a new user meets them: every error names the file and the tensor or field."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxrl_peft.models import hf, safetensors_io

ROOT = Path(__file__).resolve().parents[3]
ASSET = ROOT / "assets" / "tiny-r1"


@pytest.fixture
def ckpt(tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(ASSET, out)
    return out


def test_truncated_file_names_file_and_tensor(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: tensor '.*': data ends at byte \d+ but the "
                                                 r"file holds only \d+ bytes of data: the file is truncated"):
        hf.load(ckpt)


def test_header_length_larger_than_the_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**15) + data[8:])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: header length 1000000000000000 bytes exceeds "
                                                 r"the file"):
        hf.load(ckpt)


def test_offsets_past_the_end_and_wrong_sizes(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors_io.save_safetensors(path, {"a": np.zeros((4, 4), np.float32)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["a"]["data_offsets"] = [0, 640]
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(safetensors_io.CheckpointError, match=r"x\.safetensors: tensor 'a': data ends at byte 640"):
        safetensors_io.SafetensorsFile(path)
    header["a"]["data_offsets"] = [0, 60]
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(safetensors_io.CheckpointError, match=r"tensor 'a': 60 bytes stored for shape \(4, 4\) F32, "
                                                             r"which needs 64"):
        safetensors_io.SafetensorsFile(path)


@pytest.mark.parametrize("field,value", [("hidden_size", "128"), ("num_hidden_layers", 2.5), ("rope_theta", "1e4"),
                                         ("vocab_size", True)])
def test_config_field_of_the_wrong_type(ckpt, field, value):
    conf = json.loads((ckpt / "config.json").read_text())
    conf[field] = value
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(hf.CheckpointError, match=rf"config\.json: field '{field}' must be"):
        hf.load(ckpt)


def test_train_command_reports_a_broken_checkpoint_without_a_traceback(ckpt, tmp_path):
    conf = json.loads((ckpt / "config.json").read_text())
    conf["hidden_size"] = "128"
    (ckpt / "config.json").write_text(json.dumps(conf))
    out = subprocess.run([sys.executable, "launch/train.py", "--config=configs/grpo_lora.py:tiny",
                          f"--config.model.checkpoint={ckpt}", f"--workdir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "config.json: field 'hidden_size' must be a positive integer, got '128'" in out.stderr
    assert "Traceback" not in out.stderr
