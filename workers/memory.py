"""This process's resident memory, as the reports and forecasts measure it (Linux: /proc and getrusage)."""

from __future__ import annotations

import os
import resource


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set: VmHWM (Linux), else ru_maxrss. Linux's ru_maxrss of a process
    started by another one begins at what the parent held when it forked (a merge started by a large test process
    reported that process's memory on top of its own); VmHWM counts this program's memory only."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    """Resident set right now: what a forecast adds its working set to (the peak may be an earlier phase's)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
