"""Measuring one tool run in a fresh subprocess: wall time, peak memory, and whether the machine was quiet.

Shared by the benchmarks that put rankmerge next to other tools (static_merge.py, anchors.py):

    from measure import flush, measure, wait_quiet
    flush(); wait_quiet()
    run = measure(cmd, log, env, rss_limit=21e9, timeout=3600)
    run.status, run.wall, run.rss, run.tree, run.background

Keep the measuring process small: a child's ru_maxrss starts at the parent's own peak RSS (CPython
spawns with vfork, and exec keeps the old address space's high-water mark), so a parent that once
held 3 GB reports every later child as >= 3 GB. Read tensors in a subprocess, not in the parent.

A run is killed (its whole process tree) when the tree's resident memory passes `rss_limit` or the
machine runs low on memory, or when it outlives `timeout`; that is recorded as a result ("oom",
"timeout"), since a tool that cannot fit the machine is an answer, not an error.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from safetensors import safe_open

from process_tree import kill_tree  # benchmarks/ is on sys.path: this script's own directory

LOG = logging.getLogger("measure")
REPO = Path(__file__).resolve().parent.parent
BUSY_LIMIT = 0.15  # cores busy with other work that make a timing untrustworthy
SAMPLE_S = 0.05
MIN_AVAILABLE = 1.0e9  # bytes the machine keeps free for everybody else; below it the run is stopped


@dataclass
class Run:
    """One measured subprocess. rss: ru_maxrss of the child (bytes); tree: sampled peak RSS of its tree."""

    status: str  # ok | failed | oom | timeout
    wall: float
    rss: int
    tree: int
    background: float  # CPU cores other processes kept busy meanwhile
    returncode: int
    detail: str = ""

    def exit_unless_ok(self, cmd: list[str], log: Path) -> None:
        """For benchmarks where any failure invalidates the whole comparison."""
        if self.status != "ok":
            sys.exit(f"{cmd[0]} {self.status} (exit {self.returncode}{', ' + self.detail if self.detail else ''}); "
                     f"see {log}:\n{log.read_text()[-3000:]}")


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O)."""
    cpu = psutil.cpu_times()
    return sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0)


def flush() -> None:
    """Write back pending dirty pages (untimed), so no run pays for the previous run's output."""
    os.sync()


def wait_quiet(limit_s: float = 180.0) -> None:
    """On a shared 2-core box, start a run only once other work has (mostly) stopped."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        b0 = busy_seconds()
        time.sleep(1.0)
        if busy_seconds() - b0 < BUSY_LIMIT:
            return
        LOG.info("machine busy with other work; waiting")
    LOG.warning("machine still busy after %.0f s; measuring anyway", limit_s)


def warm_page_cache(files: list[Path], share: float = 0.6) -> bool:
    """Read `files` once (untimed) so every tool starts from a warm page cache, not just the later ones.

    Only when they fit in `share` of the memory available now; returns whether they were read.
    """
    total = sum(f.stat().st_size for f in files)
    if total > share * psutil.virtual_memory().available:
        LOG.info("inputs (%.1f GB) do not fit in the page cache; left as they are", total / 1e9)
        return False
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return True


def tree_rss(root: psutil.Process) -> int:
    """Summed RSS of a process and all its descendants (catches tools that fan out to workers)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:  # the root has just exited
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def over_limit(tree: int, rss_limit: float | None) -> str:
    """Why the run must stop now to keep the machine alive, or '' when it may go on."""
    if rss_limit is not None and tree > rss_limit:
        return f"tree RSS {tree / 1e9:.1f} GB > limit {rss_limit / 1e9:.1f} GB"
    available = psutil.virtual_memory().available
    if available < MIN_AVAILABLE:
        return f"machine down to {available / 1e9:.1f} GB available"
    return ""


def measure(cmd: list[str], log: Path, env: dict, rss_limit: float | None = None,
            timeout: float | None = None) -> Run:
    """Run cmd; return its wall time, ru_maxrss, sampled tree RSS and other CPU load meanwhile.

    ru_maxrss comes from wait4() on that very child (largest single process, as the kernel
    counted it); the tree sum is sampled every 50 ms with psutil. The background figure flags
    runs that shared the cores with something else, which makes their times meaningless.
    The child gets a session of its own so that a guard can kill exactly its tree.
    """
    status, detail = "ok", ""
    with open(log, "w") as fh:
        busy0 = busy_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        ps, tree_peak = psutil.Process(proc.pid), 0
        try:
            # WNOWAIT: the exited child stays a zombie, so its process group id cannot be reused
            # before kill_tree below has ended any leftovers (daemonised workers) of that tool.
            while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                tree = tree_rss(ps)
                tree_peak = max(tree_peak, tree)
                reason = over_limit(tree, rss_limit)
                if reason or (timeout is not None and time.perf_counter() - t0 > timeout):
                    status, detail = ("oom", reason) if reason else ("timeout", f"> {timeout:.0f} s")
                    LOG.warning("stopping %s: %s", Path(cmd[0]).name, detail)
                    break
                time.sleep(SAMPLE_S)
            wall = time.perf_counter() - t0
        finally:
            kill_tree(proc.pid)
            _, wait_status, ru = os.wait4(proc.pid, 0)
        background = (busy_seconds() - busy0 - ru.ru_utime - ru.ru_stime) / wall
    code = os.waitstatus_to_exitcode(wait_status)
    if status == "ok" and code != 0:
        status, detail = "failed", last_error(log)
    return Run(status, wall, ru.ru_maxrss * 1024, tree_peak, background, code, detail)  # ru_maxrss: KiB


def last_error(log: Path) -> str:
    """The last line of a failed tool's log that looks like an error: what a table row can show."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line[:200]
    return lines[-1][:200] if lines else "no output"


# --------------------------------------------------------------------------- what was measured
def rel(text: str) -> str:
    """Paths as the reader would type them: relative to the repo root."""
    return str(text).replace(str(REPO) + os.sep, "")


def tensor_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard, from the headers of the directory's top-level safetensors (heads/ excluded).

    Opened with the numpy backend, so a measuring process need not import torch.
    """
    index = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "numpy") as f:
            index.update({k: shard for k in f.keys()})
    return index


def n_params(model_dir: Path) -> int:
    """Parameters stored in a checkpoint directory, from the headers alone."""
    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, "numpy") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total
