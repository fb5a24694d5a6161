"""The driver's claim on its job directory, taken before any heavy work: the directory is a sane place for this job,
its record (a submitted job) names this very job, and no other driver holds it (cluster/lease.py)."""

from __future__ import annotations

from rankmerge.cluster.lease import Lease, driver_lease
from rankmerge.service.merge_job import check_job_dir
from rankmerge.service.registry import check_against_record
from rankmerge.service.spec import MergeJob


def take_driver_lease(job: MergeJob) -> Lease:
    """Refuse a misplaced job_dir, a spec the record does not name, or a second driver (one line, exit 2); else the
    held lease, renewed until released."""
    check_job_dir(job)  # before the lease file is written: never into an input or the output
    check_against_record(job)
    return driver_lease(job.resolved_job_dir).acquire()
