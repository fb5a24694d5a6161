"""This process's resident memory, as the reports and forecasts measure it (Linux: /proc and getrusage)."""

from __future__ import annotations

import os
import resource


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (ru_maxrss, which Linux counts in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set right now: what a forecast adds its working set to (the peak may be an earlier phase's)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
