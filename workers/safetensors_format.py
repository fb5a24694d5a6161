"""The safetensors file format: header parsing with strict validation, and header building for the writer.

We parse headers ourselves (instead of only trusting `safe_open`) so that truncated or corrupt files are caught
before any heavy work with a message that says what is wrong, and so the writer can lay out a file in advance.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rankmerge.workers.errors import MergeInputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return numel(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, shape, dtype and absolute byte range in that file."""

    name: str
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header; returns (entries by name, file metadata)."""
    fix = "re-download or re-save this checkpoint"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise MergeInputError(f"corrupt safetensors file {path}: only {size} bytes, no header", fix)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise MergeInputError(
                f"corrupt safetensors file {path}: header claims {header_len} bytes but the file has {size}", fix
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MergeInputError(f"corrupt safetensors file {path}: unreadable header ({exc.msg if hasattr(exc, 'msg') else exc})", fix) from None
    if not isinstance(header, dict):
        raise MergeInputError(f"corrupt safetensors file {path}: header is not a JSON object", fix)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeInputError(f"corrupt safetensors file {path}: bad header entry for {name!r}", fix) from None
        expected = nbytes(shape, dtype)
        if end - begin != expected or begin < 0:
            raise MergeInputError(
                f"corrupt safetensors file {path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}", fix
            )
        if end > data_len:
            raise MergeInputError(
                f"truncated safetensors file {path}: tensor {name!r} ends at byte {end} of the data but the file holds "
                f"only {data_len} (an interrupted download or copy?)",
                fix,
            )
        spans.append((begin, end))
        entries[name] = TensorEntry(name, path, shape, dtype, data_start + begin, data_start + end)
    spans.sort()
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        if b1 < e0:
            raise MergeInputError(f"corrupt safetensors file {path}: tensors overlap in the data section", fix)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def build_header(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay tensors out back to back in the given order; returns (header bytes incl. length prefix, offsets)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in layout:
        n = nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = (pos, pos + n)
        pos += n
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # data section starts 8-byte aligned
    return struct.pack("<Q", len(body)) + body, offsets
