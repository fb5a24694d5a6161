"""rankmerge: distributed, resumable model merging (static merges, AdaMerging and AdaRank on Ray).

The installed package is `rankmerge` with three subpackages (folders at the repository root):
`rankmerge.service` (CLI, job spec, job runner, job service), `rankmerge.workers` (checkpoint I/O, merge math,
adaptive state) and `rankmerge.cluster` (coordinator, checkpoints, local and Ray executors).
`python -m rankmerge` is the `rankmerge` command.
"""

from typing import Any

__all__ = ["load_task_model", "export_task_model"]

_LAZY = {"load_task_model": "rankmerge.service.task_model", "export_task_model": "rankmerge.service.task_model"}


def __getattr__(name: str) -> Any:
    """`rankmerge.load_task_model` without importing torch and transformers on `import rankmerge`."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
