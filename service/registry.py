"""The job registry: one JSON record per job, kept in the job directory on shared storage, outside Ray.

Ray keeps job state on the head node; a lost head loses it. The record here holds what is needed to carry on without
the head: the spec (a resolved copy, `spec.yaml`), every attempt (Ray submission id, address, outcome), the status
history, the last checkpoint seen and the outputs. It also binds the job directory to one job: the spec hash and the
output are recorded on the first submit, and a different job aimed at the same directory is refused, so two jobs
never write each other's checkpoints.

Writes are atomic (temp file, fsync, rename). Read-modify-write cycles hold a lease on a lock file beside the record
(cluster/lease.py: a link(2)-created file with heartbeat, expiry and fencing token, since flock is unreliable on some
NFS setups), and every record write checks that lease's token first, so watchers and `rankmerge status` can update
one job at once and a writer that stalled past its lease never overwrites a newer record. A record names the job
directory it belongs to; one read from another directory (copied from another job) is refused.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from rankmerge.cluster.lease import DEFAULT_TTL, Lease
from rankmerge.service.spec import MergeJob
from rankmerge.workers.atomic_io import write_atomic
from rankmerge.workers.errors import MergeInputError

RECORD = "rankmerge-job.json"
SPEC_COPY = "spec.yaml"
LOCK = ".rankmerge-job.lock"
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
    overwrite: bool | None = Field(None, description="the spec's `overwrite` at submit (None: records from before)")

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


def load_record(job_dir: Path) -> JobRecord | None:
    """The record in `job_dir`; refused when damaged, or when it names another job directory (a copied record)."""
    path = record_path(job_dir)
    if not path.is_file():
        return None
    try:
        record = JobRecord.model_validate_json(path.read_text())
    except (ValidationError, ValueError) as exc:
        raise MergeInputError(f"the job record {path} is damaged ({str(exc).splitlines()[0]})",
                              "restore it from a backup, or start the job again in a new job_dir") from None
    if record.job_dir.resolve() != Path(job_dir).resolve():
        raise MergeInputError(f"the job record {path} belongs to job {record.job_id} in {record.job_dir}, not to "
                              f"{job_dir} (copied from another job?)",
                              "restore this job's own record, or remove the copy and submit this job again")
    return record


def save_record(record: JobRecord, lease: Lease | None = None) -> None:
    """Write the record; `lease`: the record lock held by this writer, whose token must still be current."""
    if lease is not None:
        lease.check()
    write_atomic(record_path(record.job_dir), record.model_dump_json(indent=1) + "\n")


@contextmanager
def _locked(job_dir: Path) -> Iterator[Lease]:
    """The record lock: waits for another writer (a dead one's lease expires), then yields the lease to fence with."""
    job_dir.mkdir(parents=True, exist_ok=True)
    with Lease(job_dir / LOCK, "record writer").acquire(wait=2 * DEFAULT_TTL) as lease:
        yield lease


def update_record(job_dir: Path, change: Callable[[JobRecord], Any]) -> JobRecord:
    """Read, change and write the record under the lock; returns the record as written. When `change` raises, nothing
    is written."""
    with _locked(job_dir) as lease:
        record = load_record(job_dir)
        if record is None:
            raise MergeInputError(f"{job_dir} holds no rankmerge job record", "submit the job first with `rankmerge submit`")
        change(record)
        save_record(record, lease)
        return record


def claim_job_dir(job: MergeJob, address: str) -> tuple[JobRecord, bool]:
    """The record of `job` in its job_dir: a new one, or the existing one when it is the same job.

    Returns (record, created). A different spec or another output in the same job_dir is refused: its checkpoints
    would be mixed with this job's.
    """
    job_dir = job.resolved_job_dir
    with _locked(job_dir) as lease:
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
                           address=address, overwrite=job.overwrite)
        write_atomic(job_dir / SPEC_COPY, spec_copy_text(job))
        save_record(record, lease)
        return record, True


def check_against_record(job: MergeJob, job_dir: Path | None = None) -> None:
    """A driver runs only the job its job_dir's record names: a hand-edited spec copy (another output, job_dir,
    overwrite or spec) would write somewhere the record does not know, or replace what is there. `job_dir`: the
    folder whose record to check against (default: the spec's own job_dir; the spec copy's folder when run from one)."""
    job_dir = job_dir or job.resolved_job_dir
    record = load_record(job_dir)
    if record is None:
        return
    wanted = {"spec hash": record.spec_hash, "output": record.output, "job_dir": record.job_dir,
              "overwrite": job.overwrite if record.overwrite is None else record.overwrite}
    given = {"spec hash": job.spec_hash(), "output": job.output, "job_dir": job.resolved_job_dir, "overwrite": job.overwrite}
    wrong = [f"{k} {given[k]} (recorded: {wanted[k]})" for k in wanted if given[k] != wanted[k]]
    if wrong:
        raise MergeInputError(f"this spec does not match the record of job {record.job_id} in {job_dir}: "
                              + "; ".join(wrong), f"run the job as submitted (`rankmerge resume {record.job_id}`), "
                              "or give a changed spec its own job_dir")


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
