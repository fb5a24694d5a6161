"""Atomic, checksummed step checkpoints: `<job_dir>/checkpoints/step_00000420/{state.safetensors, meta.json}`.

A step directory is written as `.tmp-*`, fsynced, then renamed (the commit). `LATEST` is only a hint; loading scans
the step directories newest first, verifies the sha256 of the state and of meta.json itself (everything a resume reads:
step, cursors, history, guard record, spec hash and fingerprints) and falls back to the previous step on a mismatch.
Tensors live in safetensors (never pickle); everything else is JSON. A writer holding the job's driver lease
(cluster/lease.py) checks its fencing token right before the commit, so a replaced driver never commits a step.

The identity a checkpoint records is `<spec hash>+<input fingerprint>`: resuming refuses checkpoints of another spec,
and checkpoints of the same spec whose model or data files were replaced at the same paths since (a content hash of
every safetensors header plus a few sampled byte ranges of every file: cheap, and blind to mere `touch`;
workers/fingerprint.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from rankmerge.cluster.lease import Lease
from rankmerge.workers.atomic_io import fsync_path, write_atomic, write_synced
from rankmerge.workers.checkpoint_writer import SPACE_ERRNOS
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.fingerprint import HasFiles, input_fingerprint, sha256_file

log = logging.getLogger(__name__)
STATE = "state.safetensors"
META = "meta.json"
TEMP_PATTERNS = (".tmp-step_*", ".LATEST-*", ".LATEST.*.tmp")  # what save_checkpoint leaves behind when it is killed


def job_identity(spec_hash: str, checkpoints: Iterable[HasFiles], data: Iterable[Path] = ()) -> str:
    """What a checkpoint must match to be resumed: the spec and the content of its model and data files."""
    files = [f for ck in checkpoints for f in ck.files]
    return f"{spec_hash}+{input_fingerprint([*files, *data])}"


# ---- step checkpoints -------------------------------------------------------------------------------------------------
def _meta_digest(record: dict[str, Any]) -> str:
    """sha256 of the metadata itself (its own checksum left out), in a canonical form."""
    sums = {k: v for k, v in record.get("sha256", {}).items() if k != META}
    body = json.dumps({**record, "sha256": sums}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _write_step(tmp: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / STATE)
    record = {**meta, "step": step, "sha256": {STATE: sha256_file(tmp / STATE)}}
    record["sha256"][META] = _meta_digest(record)
    write_synced(tmp / META, json.dumps(record, indent=1))
    for f in (tmp / STATE, tmp):
        fsync_path(f)


def _step_of(step_dir: Path) -> int:
    return int(step_dir.name.removeprefix("step_"))


def _prune(root: Path, newest: int, keep: int) -> None:
    """Steps above the one just written are left from before a fall-back (damaged, or abandoned): remove them first;
    then keep the last `keep` steps, the one just written (the newest good one) always among them."""
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of)
    later = [p for p in steps if _step_of(p) > newest]
    earlier = [p for p in steps if _step_of(p) <= newest]
    for old in later + earlier[: -max(keep, 1)]:
        log.info("pruning checkpoint %s", old.name)
        shutil.rmtree(old, ignore_errors=True)


def _errno(exc: BaseException) -> int | None:
    """The errno of a failed write: safetensors reports it only in its message ("os error 28")."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))
    return int(found.group(1)) if found else None


def save_checkpoint(job_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 3,
                    lease: Lease | None = None) -> Path:
    """Write and commit step `step`; `lease`: the driver's lease, whose fencing token must still be current at the
    commit. A full disk is a one-line error; the previous checkpoints stay intact."""
    root = job_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_temps(root)  # of a save that was killed: the lease holder is the only writer
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_step(tmp, step, tensors, {**meta, "lease": lease.token if lease else None})
            if lease is not None:
                lease.check()
            if final.exists():  # a re-run of the same step after a crash between rename and pruning
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomic(root / "LATEST", final.name + "\n")
    except (OSError, SafetensorError) as exc:
        if _errno(exc) not in SPACE_ERRNOS:
            raise
        reason = exc.strerror if isinstance(exc, OSError) else os.strerror(_errno(exc))
        raise MergeInputError(f"cannot write checkpoint step {step} in {root}: {reason}; the previous "
                              "checkpoint is intact", "free some space (or raise ulimit -f), then continue with "
                              "`rankmerge run SPEC --resume`") from None
    _prune(root, step, keep)
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
    if meta["sha256"].get(META) != _meta_digest(meta):
        raise ValueError("meta.json checksum mismatch")
    if meta.get("step") != _step_of(step_dir):
        raise ValueError(f"meta.json names step {meta.get('step')}")
    if sha256_file(step_dir / STATE) != meta["sha256"].get(STATE):
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
