"""The job registry: one JSON record per job, kept in the job directory on shared storage, outside Ray.

Ray keeps job state on the head node; a lost head loses it. The record here holds what is needed to carry on without
the head: the spec (a resolved copy, `spec.yaml`), every attempt (Ray submission id, address, outcome), the status
history, the last checkpoint seen and the outputs. It also binds the job directory to one job: the spec hash and the
output are recorded on the first submit, and a different job aimed at the same directory is refused, so two jobs
never write each other's checkpoints.

Writes are atomic (temp file, fsync, rename) and read-modify-write cycles hold an flock on a lock file beside the
record, so a watcher and a `rankmerge status` can update the same job at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from service.spec import MergeJob
from workers.errors import MergeInputError

RECORD = "rankmerge-job.json"
SPEC_COPY = "spec.yaml"
LOGS = "logs"
ACTIVE = ("PENDING", "RUNNING")  # Ray JobStatus values of an attempt that is still going
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED", "LOST")  # LOST: the head no longer knows the attempt


class Attempt(BaseModel):
    submission_id: str
    address: str
    resume: bool
    submitted_at: float
    status: str = "PENDING"
    exit_code: int | None = None
    message: str | None = None
    ended_at: float | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


class StatusEvent(BaseModel):
    time: float
    status: str
    submission_id: str | None = None
    note: str | None = None


class JobRecord(BaseModel):
    """Everything about one job that must survive the Ray head."""

    job_id: str
    job_dir: Path
    spec_hash: str
    output: Path
    method: str
    steps: int | None = Field(None, description="adaptation steps (adaptive jobs), for progress")
    created_at: float
    address: str
    status: str = "SUBMITTING"
    cancel_requested: bool = False
    attempts: list[Attempt] = Field(default_factory=list)
    history: list[StatusEvent] = Field(default_factory=list)
    last_checkpoint: int | None = None
    outputs: dict[str, str] = Field(default_factory=dict)

    @property
    def spec_path(self) -> Path:
        return self.job_dir / SPEC_COPY

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def set_status(self, status: str, submission_id: str | None = None, note: str | None = None) -> None:
        """Append to the history only on a change, so polling does not flood it."""
        if status != self.status or (note and self.history and note != self.history[-1].note):
            self.history.append(StatusEvent(time=time.time(), status=status, submission_id=submission_id, note=note))
        self.status = status


def record_path(job_dir: Path) -> Path:
    return job_dir / RECORD


def new_job_id(job: MergeJob) -> str:
    """Readable and unique: the output's name plus a random suffix (the same spec may run twice, elsewhere)."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in job.output.name)[:40] or "job"
    return f"{stem}-{secrets.token_hex(3)}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_record(job_dir: Path) -> JobRecord | None:
    path = record_path(job_dir)
    if not path.is_file():
        return None
    try:
        return JobRecord.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as exc:
        raise MergeInputError(f"the job record {path} is damaged ({str(exc).splitlines()[0]})",
                              "restore it from a backup, or start the job again in a new job_dir") from None


def save_record(record: JobRecord) -> None:
    write_atomic(record_path(record.job_dir), record.model_dump_json(indent=1) + "\n")


@contextmanager
def _locked(job_dir: Path) -> Iterator[None]:
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / ".rankmerge-job.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_record(job_dir: Path, change: Callable[[JobRecord], Any]) -> JobRecord:
    """Read, change and write the record under the lock; returns the record as written."""
    with _locked(job_dir):
        record = load_record(job_dir)
        if record is None:
            raise MergeInputError(f"{job_dir} holds no rankmerge job record", "submit the job first with `rankmerge submit`")
        change(record)
        save_record(record)
        return record


def claim_job_dir(job: MergeJob, address: str) -> tuple[JobRecord, bool]:
    """The record of `job` in its job_dir: a new one, or the existing one when it is the same job.

    Returns (record, created). A different spec or another output in the same job_dir is refused: its checkpoints
    would be mixed with this job's.
    """
    job_dir = job.resolved_job_dir
    with _locked(job_dir):
        record = load_record(job_dir)
        if record is not None:
            if record.spec_hash != job.spec_hash() or record.output != job.output:
                raise MergeInputError(
                    f"job_dir {job_dir} belongs to job {record.job_id} (spec {record.spec_hash}, output {record.output}), "
                    f"not to this spec ({job.spec_hash()}, output {job.output})",
                    "give this job its own `job_dir:` (or another `output:`), or remove that job's directory")
            return record, False
        record = JobRecord(job_id=new_job_id(job), job_dir=job_dir, spec_hash=job.spec_hash(), output=job.output,
                           method=job.method, steps=job.tta.steps if job.tta else None, created_at=time.time(),
                           address=address)
        write_atomic(job_dir / SPEC_COPY, spec_copy_text(job))
        save_record(record)
        return record, True


def spec_copy_text(job: MergeJob) -> str:
    """The resolved spec (absolute paths, explicit job_dir): what every attempt's driver runs, wherever it starts."""
    data = job.model_dump(mode="json")
    data["job_dir"] = str(job.resolved_job_dir)
    return yaml.safe_dump(data, sort_keys=False)


def last_checkpoint_step(job_dir: Path) -> int | None:
    """The newest committed step directory (the LATEST file is only a hint; the directories are the truth)."""
    steps = sorted(p.name for p in (job_dir / "checkpoints").glob("step_*") if p.is_dir())
    return int(steps[-1].removeprefix("step_")) if steps else None


def log_path(job_dir: Path, submission_id: str) -> Path:
    return job_dir / LOGS / f"{submission_id}.log"
