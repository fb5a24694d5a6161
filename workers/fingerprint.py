"""Content identity of input files: a hash of every safetensors header plus a few sampled byte ranges of every file —
cheap on any model size, blind to mere `touch`, changed by a file replaced at the same path. Checkpoints record it to
refuse a resume on replaced inputs; every published report records it per input."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from rankmerge.workers.safetensors_format import MAX_HEADER_BYTES

SAMPLE_BYTES = 64 * 1024
SAMPLES_PER_FILE = 5


class HasFiles(Protocol):
    files: list[Path]


def sha256_file(path: Path) -> str:
    """sha256 of a whole file, read in 1 MiB chunks (checkpoint state, the teacher cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sample_offsets(size: int) -> list[int]:
    """Evenly spaced chunk starts from the first to the last SAMPLE_BYTES of a file."""
    last = max(size - SAMPLE_BYTES, 0)
    return sorted({last * i // (SAMPLES_PER_FILE - 1) for i in range(SAMPLES_PER_FILE)})


def _hash_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, MAX_HEADER_BYTES)))
        for offset in _sample_offsets(size):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))


def _files(path: Path) -> Iterable[Path]:
    """A data path's files: itself, or every file under a folder (image folders), in a fixed order."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def input_fingerprint(paths: Iterable[Path]) -> str:
    """Content identity of the input files (not of their times): headers plus sampled byte ranges."""
    h = hashlib.sha256()
    for path in paths:
        for f in _files(Path(path)):
            _hash_file(h, f)
    return h.hexdigest()[:16]
