"""Atomic small-file writes: a temp file beside the target, fsynced, renamed over it — readers see the old or the new
content, never a half-written file, also on shared (NFS-like) storage where rename is the one atomic operation."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to stable storage (a folder: so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: str | bytes) -> None:
    """`data` in `path`, on stable storage when this returns. Alone it is not atomic: for a file inside a temp folder
    that is itself renamed into place (an output, a checkpoint step), or as the first half of `write_temp`."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_temp(path: Path, data: str | bytes) -> Path:
    """`data` in a fresh, fsynced temp file beside `path` (same folder: the later rename or link stays atomic)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        write_synced(tmp, data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` in one step (its folder must exist)."""
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
