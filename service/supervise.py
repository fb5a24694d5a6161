"""Watch a job and resubmit it when its driver dies: Ray never retries a job, so the service does.

A new attempt runs the driver with `--resume` and continues from the last checkpoint; the result is the same as an
uninterrupted run. Not every failure is worth another attempt: a user error (the driver exits 2 with a one-line
message) fails the same way again, and a cancelled job stays cancelled. An unreachable head is waited for, up to
`unreachable_timeout`; pass the new head's address to continue on another cluster.

One watcher per job: it holds `job_dir/watcher.lease` (cluster/lease.py) for its life, and a second one is refused
at once (one line, exit 2). Should two ever race anyway (a lease taken over from a stalled watcher), the record lets
only one of them start the next attempt; the other follows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from rankmerge.cluster.lease import Lease
from rankmerge.service.exit_codes import EXIT_USER_ERROR
from rankmerge.service.job_service import AttemptStarted, follow, start_attempt
from rankmerge.service.jobs_client import HeadUnreachable, JobsClient
from rankmerge.service.registry import JobRecord, load_record

WATCHER_LEASE = "watcher.lease"

log = logging.getLogger(__name__)


def should_resubmit(record: JobRecord, max_attempts: int) -> bool:
    attempt = record.current
    if attempt is None or attempt.active or record.cancel_requested or record.status in ("SUCCEEDED", "STOPPED"):
        return False
    if attempt.exit_code == EXIT_USER_ERROR:
        log.warning("job %s: attempt %s failed on a user error; not resubmitting", record.job_id, attempt.submission_id)
        return False
    return len(record.attempts) < max_attempts


def supervise(record: JobRecord, on_change: Callable[[JobRecord], None], address: str | None = None,
              max_attempts: int = 3, poll: float = 2.0, unreachable_timeout: float = 600.0) -> JobRecord:
    """Follow the job to its end, resubmitting (with --resume) each attempt whose driver died; returns the last record."""
    with Lease(record.job_dir / WATCHER_LEASE, "watcher").acquire():
        return _watch(record, on_change, address, max_attempts, poll, unreachable_timeout)


def _watch(record: JobRecord, on_change: Callable[[JobRecord], None], address: str | None, max_attempts: int,
           poll: float, unreachable_timeout: float) -> JobRecord:
    unreachable_since = last_failure = -float("inf")
    while True:
        try:
            record = follow(record, on_change, poll, address)
            if not should_resubmit(record, max_attempts):
                return record
            log.warning("job %s: attempt %d ended %s (exit %s); resubmitting with --resume", record.job_id,
                        len(record.attempts), record.status, record.current.exit_code)
            record = start_attempt(record, JobsClient(address or record.address), resume=True)
        except AttemptStarted as exc:
            log.info("%s; following it", exc)
            record = load_record(record.job_dir)
        except HeadUnreachable as exc:
            now = time.monotonic()
            if now - last_failure > 2 * poll + 30:  # a new outage, not the same one still going on
                unreachable_since = now
            last_failure = now
            if now - unreachable_since > unreachable_timeout:
                raise
            log.warning("job %s: %s; retrying in %.0f s", record.job_id, exc, poll)
            time.sleep(poll)
