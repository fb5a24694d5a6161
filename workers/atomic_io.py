"""Atomic small-file writes: a temp file beside the target, fsynced, renamed over it — readers see the old or the new
content, never a half-written file, also on shared (NFS-like) storage where rename is the one atomic operation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


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


def write_checked(path: Path, data: bytes, identity: str) -> None:
    """A job cache: `data` in `path` atomically, then a `<name>.sha256` sidecar with its checksum and the `identity`
    (job and inputs) it was computed for. The sidecar goes last, so a crash in between leaves a cache that fails its
    check and is recomputed."""
    write_atomic(path, data)
    write_atomic(path.with_name(f"{path.name}.sha256"), json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "identity": identity}))


def read_checked(path: Path, identity: str) -> bytes | None:
    """A cache's bytes when its sidecar names `identity` and their checksum (read once: checked and parsed from the
    same bytes); None when there is none yet, or it belongs to another job or is damaged (then recompute it)."""
    try:
        record = json.loads(path.with_name(f"{path.name}.sha256").read_text())
        data = path.read_bytes()
    except (OSError, ValueError):
        return None  # no cache yet, or an unreadable sidecar
    if not isinstance(record, dict) or record.get("identity") != identity or record.get("sha256") != hashlib.sha256(data).hexdigest():
        log.warning("cache %s does not match this job or is damaged: recomputing it", path)
        return None
    return data
