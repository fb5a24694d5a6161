"""Peak memory of a whole process tree (a driver and everything it started: Ray's GCS, raylet, actors), sampled.

Summing RSS over a Ray job counts the object store many times: plasma is one shared-memory file that every process
maps, and each page counts in the RSS of every process that touched it (the shard that wrote the weights, each rank
that read them). The sum of PSS (proportional set size, /proc/PID/smaps_rollup) charges a page shared by k processes
1/k to each, so over the whole tree every page — plasma, shared libraries — counts exactly once. RSS is sampled too,
for comparison.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field

import psutil

ROLES = (("ray::ShardHost", "shards"), ("ray::WorkerHost", "workers"), ("ray::", "idle Ray workers"))


def role_of(proc: psutil.Process, root_pid: int) -> str:
    """driver | shards | workers | idle Ray workers | Ray system (GCS, raylet, agents)."""
    if proc.pid == root_pid:
        return "driver"
    title = " ".join(proc.cmdline()[:1])
    for prefix, role in ROLES:
        if title.startswith(prefix):
            return role
    return "Ray system"


@dataclass
class TreePeak:
    pss: int = 0
    rss: int = 0
    by_role: dict[str, int] = field(default_factory=dict)  # PSS per role at the PSS peak
    samples: int = 0


class TreeSampler:
    """Samples Σ PSS and Σ RSS of `pid` and all its descendants every `interval` seconds in a background thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = TreePeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        pss = rss = 0
        by_role: dict[str, int] = {}
        for proc in procs:
            try:
                mem = proc.memory_full_info()
                role = role_of(proc, self.root.pid)
            except psutil.Error:  # ended between the listing and the read
                continue
            pss += mem.pss
            rss += mem.rss
            by_role[role] = by_role.get(role, 0) + mem.pss
        self.peak.samples += 1
        self.peak.rss = max(self.peak.rss, rss)
        if pss > self.peak.pss:
            self.peak.pss, self.peak.by_role = pss, by_role

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def available_bytes() -> int:
    return psutil.virtual_memory().available


def kill_tree(pid: int) -> None:
    """SIGKILL a child and everything it started, nothing else: its descendants (also those that left its process
    group, as Ray's daemons do) and, when it leads a process group of its own (`start_new_session=True`), every
    process still in that group — which catches daemonised leftovers even after the child itself has exited."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in descendants:
        try:
            proc.kill()
        except psutil.Error:
            pass
