"""Progress of long work: a tqdm bar on a terminal, and — where stderr is not a terminal (a job log, a pipe) — one log
line every PROGRESS_SECONDS with the same counts, rate and ETA, as users of tqdm-based jobs expect in their logs.

The lines go to the `rankmerge.workers.progress` logger at INFO; the CLI shows them without -v.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
PROGRESS_SECONDS = float(os.environ.get("RANKMERGE_PROGRESS_SECONDS", "30"))
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")  # cursor moves of nested bars, carriage returns


class _LogLines:
    """A file-like target for tqdm that turns each refresh into one log line (carriage returns dropped)."""

    def write(self, text: str) -> None:
        line = _CONTROL.sub("", text).strip()
        if line:
            log.info("%s", line)

    def flush(self) -> None:
        pass


def progress(**kwargs: Any) -> tqdm:
    """tqdm(**kwargs) on a terminal; periodic log lines otherwise."""
    if sys.stderr.isatty():
        return tqdm(**{"disable": None, **kwargs})
    return tqdm(**{**kwargs, "file": _LogLines(), "disable": False, "leave": False, "mininterval": PROGRESS_SECONDS,
                   "maxinterval": PROGRESS_SECONDS, "ascii": True, "ncols": 100})
