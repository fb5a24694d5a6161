"""The merge-job lifecycle on Ray Jobs: submit, refresh, resume, cancel, follow — with the registry as the record.

One job = one job directory = any number of attempts (Ray submissions). Every attempt runs the same driver,
`rankmerge run <job_dir>/spec.yaml --executor ray --address auto`, later ones with `--resume`: the driver continues
from the newest intact checkpoint, so the job ends where an uninterrupted run ends. Ray's view of an attempt is
copied into the registry whenever a command looks at it; what Ray forgets (a lost head) the registry keeps.

Truthful records under races: Ray's answer about an attempt is written onto that attempt (by submission id), never
onto whatever attempt is current by then; a new attempt is started only under the record lock, and only when the
attempt its caller saw ending is still the current one — so two watchers resubmit at most once — and only once the
last driver's lease is free (cluster/lease.py), so two drivers never share a job dir.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from rankmerge.cluster.lease import DRIVER_LEASE, wait_until_free
from rankmerge.service.job_index import add_to_index
from rankmerge.service.jobs_client import AttemptInfo, JobsClient, driver_command
from rankmerge.service.registry import (TERMINAL, Attempt, JobRecord, claim_job_dir, last_checkpoint_step, load_record, log_path,
                              update_record)
from rankmerge.service.spec import MergeJob, job_from_dict, load_job_file
from rankmerge.workers.atomic_io import write_atomic
from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)


# ---- submit -------------------------------------------------------------------------------------------------------
def check_job(job: MergeJob) -> None:
    """Every cheap check `rankmerge run` makes (paths, headers, method parameters, output location), here, before
    anything reaches the cluster; plus where the job directory may go. The spec's paths are already absolute."""
    from rankmerge.service.merge_job import check_job_dir, open_inputs, prepare

    with ExitStack() as stack:
        if job.adaptive:
            open_inputs(job, stack)
        else:
            prepare(job, stack)
    data = [(f"tta.data.{name}", path) for name, path in (job.tta.data.items() if job.tta else ())]
    for name, path in data:
        if not path.exists():
            raise MergeInputError(f"{name} {path} does not exist", "fix the path in the spec (relative paths start at the spec's folder)")
    check_job_dir(job)  # adaptive jobs: already in open_inputs; static ones keep their record there too


def submit_job(spec_file: str | Path, address: str) -> JobRecord:
    """Validate, claim the job directory, submit the first attempt; returns the record."""
    job = job_from_dict(load_job_file(spec_file), Path(spec_file).resolve().parent)
    check_job(job)
    client = JobsClient(address)  # fails on a bad address or token before the job directory is touched
    if load_record(job.resolved_job_dir) is None and last_checkpoint_step(job.resolved_job_dir) is not None:
        raise MergeInputError(f"job_dir {job.resolved_job_dir} holds checkpoints of a run started with `rankmerge run`",
                              "continue that one with `rankmerge run SPEC --resume`, or give this job another job_dir")
    record, created = claim_job_dir(job, client.url)
    if not created and record.attempts:
        raise MergeInputError(f"this job was already submitted as {record.job_id} (status {record.status})",
                              f"follow it with `rankmerge status {record.job_id}`, or continue it with `rankmerge resume {record.job_id}`")
    add_to_index(record)
    return start_attempt(record, client, resume=False)


class AttemptStarted(MergeInputError):
    """Another command started an attempt first (a racing watcher or `resume`): follow that one."""


def _wait_for_driver_exit(job_dir: Path) -> None:
    """A driver that just died on another host holds its lease until the TTL runs out: wait for that, not longer."""
    holder = wait_until_free(job_dir / DRIVER_LEASE, timeout=0)
    if holder is not None:
        holder = wait_until_free(job_dir / DRIVER_LEASE, timeout=holder.ttl + 5)
    if holder is not None:
        raise MergeInputError(f"a driver still runs in {job_dir}: {holder.describe()}",
                              f"wait for it to end, or stop it (kill {holder.pid} on {holder.host}) first")


def start_attempt(record: JobRecord, client: JobsClient, resume: bool) -> JobRecord:
    """Submit the next attempt, unless another one started since `record` was read (AttemptStarted)."""
    seen = record.current.submission_id if record.current else None
    if resume:
        _wait_for_driver_exit(record.job_dir)
    entrypoint = driver_command(record.spec_path, resume)

    def add(r: JobRecord) -> None:
        current = r.current
        if (current.submission_id if current else None) != seen or (current is not None and current.active):
            raise AttemptStarted(f"job {r.job_id} is {r.status} as attempt {len(r.attempts)} ({current.submission_id})",
                                 f"follow it with `rankmerge status {r.job_id}`")
        submission_id = client.submit(entrypoint, {"rankmerge_job": r.job_id, "job_dir": str(r.job_dir)})
        log.info("job %s: attempt %s submitted to %s", r.job_id, submission_id, client.url)
        r.address = client.url
        r.cancel_requested = False
        r.attempts.append(Attempt(submission_id=submission_id, address=client.url, resume=resume, submitted_at=time.time()))
        r.set_status("PENDING", submission_id, f"attempt {len(r.attempts)} submitted")

    return update_record(record.job_dir, add)


# ---- observe ------------------------------------------------------------------------------------------------------
def refresh(record: JobRecord, address: str | None = None) -> JobRecord:
    """Ask Ray about the current attempt (if it is still going) and write what it says into the registry."""
    attempt = record.current
    if attempt is None or not attempt.active:
        record = update_record(record.job_dir, observe_files)
        if attempt is not None and attempt.status in TERMINAL and attempt.status != "LOST" and \
                not log_path(record.job_dir, attempt.submission_id).is_file():  # ended under another command's eyes
            archive_logs(record, JobsClient(address or attempt.address), attempt.submission_id)
        return record
    client = JobsClient(address or attempt.address)
    info = client.info(attempt.submission_id)
    record = update_record(record.job_dir, lambda r: _apply(r, attempt.submission_id, info))
    if info.status in TERMINAL and info.status != "LOST":
        archive_logs(record, client, attempt.submission_id)
    return record


def observe_files(r: JobRecord) -> None:
    """What the job dir itself says (last checkpoint, published output): true with or without a head."""
    r.last_checkpoint = last_checkpoint_step(r.job_dir)
    report = r.output / "merge_report.json"
    if report.is_file():
        r.outputs = {"output": str(r.output), "report": str(report)}


def _apply(r: JobRecord, submission_id: str, info: AttemptInfo) -> None:
    """Ray's answer about attempt `submission_id`, onto that attempt; the job's status only while it is current."""
    attempt = next(a for a in r.attempts if a.submission_id == submission_id)
    attempt.status, attempt.exit_code = info.status, info.exit_code
    if info.status in TERMINAL:
        attempt.message, attempt.ended_at = info.message, attempt.ended_at or time.time()
    observe_files(r)
    if attempt is r.current:
        status = "STOPPED" if r.cancel_requested and info.status in TERMINAL else info.status
        r.set_status(status, submission_id, info.message if status in TERMINAL else None)


def archive_logs(record: JobRecord, client: JobsClient, submission_id: str) -> None:
    """Keep a finished attempt's driver log in the job directory: the head's copy dies with the head."""
    try:
        text = client.logs(submission_id)
    except MergeInputError as exc:
        log.warning("could not archive the logs of %s: %s", submission_id, exc)
        return
    path = log_path(record.job_dir, submission_id)
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, text)


def attempt_logs(record: JobRecord, which: str | None = None, address: str | None = None) -> str:
    """The driver log of one attempt (default: the latest): from Ray while it knows it, else the archived copy."""
    if not record.attempts:
        raise MergeInputError(f"job {record.job_id} has no attempts yet", "submit it with `rankmerge submit`")
    attempt = pick_attempt(record, which)
    try:
        return JobsClient(address or attempt.address).logs(attempt.submission_id)
    except (MergeInputError, RuntimeError) as exc:
        archived = log_path(record.job_dir, attempt.submission_id)
        if archived.is_file():
            return archived.read_text()
        raise MergeInputError(f"no logs for attempt {attempt.submission_id} ({str(exc)[:160]})",
                              "the head that ran it is gone and no copy was archived; see the job directory") from None


def pick_attempt(record: JobRecord, which: str | None) -> Attempt:
    if which is None:
        return record.attempts[-1]
    for n, attempt in enumerate(record.attempts, 1):
        if which in (str(n), attempt.submission_id):
            return attempt
    raise MergeInputError(f"job {record.job_id} has no attempt {which!r}",
                          f"give 1..{len(record.attempts)} or a submission id from `rankmerge status {record.job_id}`")


# ---- act ----------------------------------------------------------------------------------------------------------
def resume_job(record: JobRecord, address: str | None = None) -> JobRecord:
    """A new attempt that continues from the last checkpoint; refused while one runs or after success."""
    record = refresh(record, address)
    if record.current is not None and record.current.active:
        raise MergeInputError(f"job {record.job_id} is {record.status} as attempt {record.current.submission_id}",
                              f"wait for it (`rankmerge status {record.job_id}`), or `rankmerge cancel {record.job_id}` first")
    if record.status == "SUCCEEDED":
        raise MergeInputError(f"job {record.job_id} already succeeded (output {record.output})", "nothing to resume")
    return start_attempt(record, JobsClient(address or record.address), resume=True)


def cancel_job(record: JobRecord, address: str | None = None) -> JobRecord:
    """Stop the running attempt and mark the job cancelled, so no watcher resubmits it."""
    record = update_record(record.job_dir, lambda r: setattr(r, "cancel_requested", True))
    attempt = record.current
    if attempt is not None and attempt.active:
        JobsClient(address or attempt.address).stop(attempt.submission_id)
    return refresh(record, address)


def follow(record: JobRecord, on_change: Callable[[JobRecord], None], poll: float = 2.0,
           address: str | None = None) -> JobRecord:
    """Poll until the current attempt ends, calling `on_change` whenever status or checkpoint step moves."""
    seen = None
    while True:
        record = refresh(record, address)
        key = (record.status, record.last_checkpoint, len(record.attempts))
        if key != seen:
            on_change(record)
            seen = key
        if record.current is None or not record.current.active:
            return record
        time.sleep(poll)

