"""Hugging Face safetensors directories: a memory-mapped reader and a streaming writer.

Reading maps each file once (`np.memmap`) and hands out views, so loading never holds a second full
copy of the model in host memory. The format is a little-endian u64 header length, a JSON header
`{name: {dtype, shape, data_offsets}}`, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from agora_jax.models.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end}, "
                                  f"the file has {size}")
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return header, 8 + n


class SafetensorsCheckpoint:
    """All `*.safetensors` of a Hugging Face directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = pathlib.Path(directory)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path}: no config.json")
        try:
            self.hf_config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        self._where: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: lists {file.name}, which does not exist")
            header, start = _read_header(file)
            for name, info in header.items():
                self._where[name] = (file, info, start)
        self._maps: dict[pathlib.Path, np.memmap] = {}

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name` (HF layout and dtype)."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file, info, start = self._where[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[file][start + begin:start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: pathlib.Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray]) -> None:
    """Stream tensors into one file: the header from shapes first, then each tensor as fetched."""
    entries, offset = {}, 0
    order = list(tensors)
    for name, shape, dtype in order:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        entries[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name, shape, dtype in order:
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
            f.write(array.tobytes())
