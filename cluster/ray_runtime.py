"""Connect to a Ray cluster, or start an embedded local one sized for the job."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None, cpus_needed: float) -> None:
    """Reuse an initialised Ray, connect to `address`, or start a local Ray with enough logical CPUs for the job.

    Logical CPUs only reserve scheduling slots: on a 2-core machine a job of 2 shards and 2 workers still runs,
    its actors sharing the cores.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
    # The embedded cluster is private to this process: no dashboard, no token to hand to other clients.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log.info("starting an embedded local Ray with %d logical CPUs", cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=max(256 * 1024**2, min(4 * 1024**3, int(0.1 * _total_memory()))))


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
