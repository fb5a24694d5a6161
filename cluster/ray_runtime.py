"""Connect to a Ray cluster, or start an embedded local one sized for the job."""

from __future__ import annotations

import logging
import os
import socket

from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)


def ensure_ray(address: str | None, cpus_needed: float, store_bytes: int = 0) -> None:
    """Reuse an initialised Ray, connect to `address`, or start a local Ray with enough logical CPUs for the job.

    Logical CPUs only reserve scheduling slots: on a 2-core machine a job of 2 shards and 2 workers still runs,
    its actors sharing the cores. `store_bytes`: one step's merged weights; the embedded store holds twice that, so
    no step spills to disk (shared memory is only taken as objects are written).
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
    # The embedded cluster is private to this process: no dashboard, no token to hand to other clients.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log.info("starting an embedded local Ray with %d logical CPUs", cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=object_store_size(store_bytes, _total_memory()))


def object_store_size(store_bytes: int, total_memory: int) -> int:
    """10% of memory within [256 MB, 4 GB], raised to 2 × one step's weights, at most half the memory.

    Twice, because the driver lets the weights go before gradients of about their size are made, but objects are
    freed asynchronously: with less room a 1B-model step spilled to disk (a spill worker of 2 GB, steps ~2× slower).
    """
    default = max(256 * 1024**2, min(4 * 1024**3, int(0.1 * total_memory)))
    return max(default, min(2 * store_bytes, total_memory // 2))


def _check_reachable(address: str) -> None:
    """Fail in seconds, with the fix, where ray.init would retry an unreachable head for minutes."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise MergeInputError(f"Ray address {address!r} is not HOST:PORT", "pass e.g. --address 10.0.0.5:6379 (the head's GCS port)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise MergeInputError(f"no Ray head answers at {address} ({exc.strerror or exc})",
                              "start one with `ray start --head`, check the address, or drop --address to run on an embedded local Ray") from None


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def user_error_of(exc: BaseException) -> MergeInputError | None:
    """The MergeInputError a remote task or actor raised, if that is what a RayTaskError wraps."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MergeInputError) else None


def run_remote(function, *args, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """Run one function as a Ray task and return its result; a user error inside comes back as the same one-liner."""
    import ray
    from ray.exceptions import RayTaskError

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(function)
    try:
        return ray.get(task.remote(*args))
    except RayTaskError as exc:
        error = user_error_of(exc)
        if error is not None:
            raise error from None
        raise
