"""Find a job by its id: a small index from job id to job directory.

The record itself lives in the job directory (service/registry.py); the index only saves typing the directory.
It is a folder of one JSON file per job, `$RANKMERGE_JOBS` (default `~/.rankmerge/jobs`): put it on shared storage
to see the same jobs from every machine. Every command also accepts the job directory itself, so a lost index loses
nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rankmerge.service.registry import RECORD, JobRecord, load_record
from rankmerge.workers.atomic_io import write_atomic
from rankmerge.workers.errors import MergeInputError

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def index_dir() -> Path:
    return Path(os.environ.get("RANKMERGE_JOBS") or Path.home() / ".rankmerge" / "jobs")


def add_to_index(record: JobRecord) -> None:
    folder = index_dir()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{record.job_id}.json", json.dumps({"job_id": record.job_id, "job_dir": str(record.job_dir)}) + "\n")


def find_job(ref: str) -> JobRecord:
    """A job id from the index, or a job directory (or its spec copy / record file) given as a path."""
    path = Path(ref)
    if path.name in (RECORD, "spec.yaml") and path.is_file():
        path = path.parent
    if path.is_dir():
        record = load_record(path.resolve())
        if record is None:
            raise MergeInputError(f"{path} holds no rankmerge job record", "give a job id from `rankmerge list` or a job directory")
        return record
    entry = index_dir() / f"{ref}.json"
    if not JOB_ID.match(ref) or not entry.is_file():
        raise MergeInputError(f"unknown job {ref!r}", f"give a job id from `rankmerge list` (index: {index_dir()}) or the job directory")
    job_dir = Path(json.loads(entry.read_text())["job_dir"])
    record = load_record(job_dir)
    if record is None:
        raise MergeInputError(f"job {ref} points to {job_dir}, which holds no job record any more",
                              f"remove {entry} or restore the job directory")
    return record


def indexed_jobs() -> list[JobRecord]:
    """Every indexed job whose directory still holds its record, oldest first."""
    records = []
    for entry in sorted(index_dir().glob("*.json")):
        try:
            record = load_record(Path(json.loads(entry.read_text())["job_dir"]))
        except (ValueError, KeyError, OSError, MergeInputError):
            continue
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: r.created_at)
