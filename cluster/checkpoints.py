"""Atomic, checksummed step checkpoints: `<job_dir>/checkpoints/step_00000420/{state.safetensors, meta.json}`.

A step directory is written as `.tmp-*`, fsynced, then renamed (the commit). `LATEST` is only a hint; loading scans
the step directories newest first, verifies the sha256 recorded in meta.json and falls back to the previous step on
a mismatch. Tensors live in safetensors (never pickle); everything else is JSON.

The identity a checkpoint records is `<spec hash>+<input fingerprint>`: resuming refuses checkpoints of another spec,
and checkpoints of the same spec whose model or data files were replaced at the same paths since (a content hash of
every safetensors header plus a few sampled byte ranges of every file: cheap, and blind to mere `touch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import load_file, save_file
from torch import Tensor

from workers.errors import MergeInputError
from workers.safetensors_format import MAX_HEADER_BYTES

log = logging.getLogger(__name__)
STATE = "state.safetensors"
META = "meta.json"
TEMP_PATTERNS = (".tmp-step_*", ".LATEST-*")  # what save_checkpoint leaves behind when it is killed
SAMPLE_BYTES = 64 * 1024
SAMPLES_PER_FILE = 5


class HasFiles(Protocol):
    files: list[Path]


# ---- input fingerprint ----------------------------------------------------------------------------------------------
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


def job_identity(spec_hash: str, checkpoints: Iterable[HasFiles], data: Iterable[Path] = ()) -> str:
    """What a checkpoint must match to be resumed: the spec and the content of its model and data files."""
    files = [f for ck in checkpoints for f in ck.files]
    return f"{spec_hash}+{input_fingerprint([*files, *data])}"


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


# ---- step checkpoints -------------------------------------------------------------------------------------------------
def save_checkpoint(job_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 3) -> Path:
    root = job_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_temps(root)  # of a save that was killed: the coordinator is the only writer
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


def remove_temps(root: Path) -> None:
    """Half-written step folders and LATEST hints of a killed run: never committed, so never read; remove them."""
    for pattern in TEMP_PATTERNS:
        for path in root.glob(pattern):
            log.info("removing %s, left by an interrupted checkpoint", path.name)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _read_meta(step_dir: Path) -> dict[str, Any]:
    """meta.json of a step folder whose state matches its recorded checksum; ValueError/OSError when damaged."""
    meta = json.loads((step_dir / META).read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise ValueError("meta.json is not a checkpoint record")
    if _sha256(step_dir / STATE) != meta["sha256"].get(STATE):
        raise ValueError("checksum mismatch")
    return meta


def _check_identity(job_dir: Path, recorded: object, identity: str) -> None:
    """Refuse another spec's checkpoints, and this spec's when its input files changed (see the module docstring)."""
    spec, _, inputs = identity.partition("+")
    recorded_spec, _, recorded_inputs = str(recorded).partition("+")
    if recorded_spec != spec:
        raise MergeInputError(
            f"the checkpoints in {job_dir} belong to a different job spec",
            "resume with the spec that started the job, or use a new job_dir",
        )
    if inputs and recorded_inputs and recorded_inputs != inputs:  # checkpoints without a fingerprint predate it
        raise MergeInputError(
            f"the model or data files changed since the checkpoints in {job_dir} were written "
            f"(input fingerprint {recorded_inputs}, now {inputs})",
            "restore the original files, or start again without --resume in a new job_dir",
        )


def load_latest_checkpoint(job_dir: Path, identity: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Newest intact checkpoint of this job (`identity`: spec hash, optionally `+` input fingerprint), or None."""
    root = job_dir / "checkpoints"
    remove_temps(root)
    for step_dir in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        try:
            meta = _read_meta(step_dir)
        except (OSError, ValueError) as exc:
            log.warning("skipping damaged checkpoint %s (%s)", step_dir.name, exc)
            continue
        _check_identity(job_dir, meta.get("spec_hash"), identity)
        return load_file(str(step_dir / STATE)), meta
    return None
