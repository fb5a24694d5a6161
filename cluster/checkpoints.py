"""Atomic, checksummed step checkpoints: `<job_dir>/checkpoints/step_00000420/{state.safetensors, meta.json}`.

A step directory is written as `.tmp-*`, fsynced, then renamed (the commit). `LATEST` is only a hint; loading scans
the step directories newest first, verifies the sha256 recorded in meta.json and falls back to the previous step on
a mismatch. Tensors live in safetensors (never pickle); everything else is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from workers.errors import MergeInputError

log = logging.getLogger(__name__)
STATE = "state.safetensors"
META = "meta.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(job_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 3) -> Path:
    root = job_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / STATE)
        record = {**meta, "step": step, "sha256": {STATE: _sha256(tmp / STATE)}}
        (tmp / META).write_text(json.dumps(record, indent=1))
        for f in (tmp / STATE, tmp / META, tmp):
            _fsync(f)
        if final.exists():  # a re-run of the same step after a crash between rename and pruning
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / f".LATEST-{uuid.uuid4().hex[:8]}"
    latest_tmp.write_text(final.name + "\n")
    os.rename(latest_tmp, root / "LATEST")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(job_dir: Path, spec_hash: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Newest intact checkpoint of this spec, or None when there is none."""
    root = job_dir / "checkpoints"
    for step_dir in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        try:
            meta = json.loads((step_dir / META).read_text())
            if _sha256(step_dir / STATE) != meta["sha256"][STATE]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping damaged checkpoint %s (%s)", step_dir.name, exc)
            continue
        if meta.get("spec_hash") != spec_hash:
            raise MergeInputError(
                f"the checkpoints in {job_dir} belong to a different job spec",
                "resume with the spec that started the job, or use a new job_dir",
            )
        return load_file(str(step_dir / STATE)), meta
    return None
