"""What users touch: the job spec, the CLI, running jobs and writing their reports."""

from typing import Any

_LAZY = {"load_task_model": "rankmerge.service.task_model", "export_task_model": "rankmerge.service.task_model"}


def __getattr__(name: str) -> Any:
    """`rankmerge.service.load_task_model` without importing torch and transformers for every CLI command."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
