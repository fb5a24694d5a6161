"""The command line's exit codes, in a module that imports nothing of the project: every layer that reads or sets
an exit code (the CLI, the job supervisor) depends on this one, never on each other."""

from __future__ import annotations

import signal

EXIT_JOB_FAILED = 1  # a followed or supervised job ended other than SUCCEEDED
EXIT_USER_ERROR = 2  # one-line `error: problem — fix`; the same input fails the same way again, so never retried
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_READER_GONE = 128 + signal.SIGPIPE  # stdout's reader closed it, as a process killed by SIGPIPE exits
