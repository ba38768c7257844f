"""The one safetensors reader and writer of the project (decoder, RWKV-7, encoders, PEFT adapters).

Files are memory-mapped and read tensor by tensor, so a large checkpoint never needs a full host copy.
The header is validated against the file before any tensor is read: a truncated or corrupt file
fails with a message that names the file and the tensor, never with a bare reshape or memory error.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the model expects."""


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file without reading the whole file."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                first = f.read(8)
                if len(first) < 8:
                    raise CheckpointError(f"{self.path}: {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", first)
                if n > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(f"{self.path}: header length {n} bytes exceeds the file "
                                          f"({size} bytes): truncated or not a safetensors file")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header must be a JSON object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._offset = 8 + n
        data_bytes = size - self._offset
        for name, info in header.items():
            self._validate(name, info, data_bytes)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 0 else None

    def _validate(self, name: str, info: Any, data_bytes: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: header entry needs dtype, shape and data_offsets, got {info!r}")
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {info['dtype']!r}; known: {sorted(_ST_DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                  f"got {offsets!r}")
        if offsets[1] > data_bytes:
            raise CheckpointError(f"{where}: data ends at byte {offsets[1]} but the file holds only "
                                  f"{data_bytes} bytes of data: the file is truncated")
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
        if offsets[1] - offsets[0] != want:
            raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes stored for shape {tuple(shape)} "
                                  f"{info['dtype']}, which needs {want}")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(_ST_DTYPES[self.header[name]["dtype"]])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view into the mapped file."""
        if name not in self.header:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        info = self.header[name]
        start, end = info["data_offsets"]
        if start == end:
            return np.zeros(info["shape"], _ST_DTYPES[info["dtype"]])
        raw = self._mmap[self._offset + start:self._offset + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

    def load_all(self) -> dict[str, np.ndarray]:
        """Every tensor, as views into the mapped file."""
        return {name: self.get(name) for name in self.header}


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """Writes numpy arrays (bf16 via ml_dtypes included) as one .safetensors file (atomically)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


class TensorIndex:
    """Every tensor of a checkpoint directory, single-file or sharded (`<prefix>.safetensors.index.json`).

    `prefix` is the file stem: 'model' for transformers checkpoints (model.safetensors or
    model.safetensors.index.json); other names (e.g. 'diffusion_pytorch_model') work the same way.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "model"):
        self.dir = Path(directory)
        index = self.dir / f"{prefix}.safetensors.index.json"
        single = self.dir / f"{prefix}.safetensors"
        self._files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e})") from e
            for name, fname in weight_map.items():
                if not (self.dir / fname).exists():
                    raise CheckpointError(f"{index} maps tensor {name!r} to {fname}, which does not exist")
                self.where[name] = fname
        elif single.exists():
            f = self._file(single.name)
            self.where = {k: single.name for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: no {single.name} or {index.name}")

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.dir / fname)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        f = self._file(self.where[name])
        if name not in f.header:
            raise CheckpointError(f"{f.path}: tensor {name!r} is listed in the index but not in the file")
        return f.get(name)

    def file_of(self, name: str) -> str:
        return str(self.dir / self.where[name])
