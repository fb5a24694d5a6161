"""Where a benchmark's files live. Suites are large, rebuildable artefacts, so by default they sit in a user cache,
never inside a git checkout; results sit beside the suite they measure unless told otherwise.

<suite root>/results/            (or --out)
    <method>.json                one record per method (accuracy, chosen parameters, wall time)
    data/<task>/*.safetensors    label-free test inputs and the held-out halves (the suite itself is never modified)
    runs/<method>/...            the real job outputs and their specs
    table.md, table.json, *.png  written by `bench report`
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankmerge.workers.atomic_io import write_atomic
from rankmerge.workers.errors import MergeInputError

if TYPE_CHECKING:
    from rankmerge.service.suites import Suite

RECORD_SUFFIX = ".json"
REPORT_FILES = ("table.json",)


def default_suite_root(name: str) -> Path:
    """$RANKMERGE_CACHE/suites/<name>, else ~/.cache/rankmerge/suites/<name>."""
    cache = os.environ.get("RANKMERGE_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "rankmerge"
    return base / "suites" / name


def results_dir(suite_root: Path, out: Path | None = None) -> Path:
    return Path(out) if out is not None else Path(suite_root) / "results"


def record_path(results: Path, method: str) -> Path:
    return results / f"{method}{RECORD_SUFFIX}"


def run_dir(results: Path, method: str) -> Path:
    return results / "runs" / method


def write_json(path: Path, data: Any) -> None:
    """Atomic: a crash mid-run never leaves a half-written record that `report` would trip over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def read_records(results: Path) -> dict[str, dict[str, Any]]:
    """Every method record in a results folder, by method name (the report's own files excluded)."""
    records = {}
    for path in sorted(results.glob(f"*{RECORD_SUFFIX}")):
        if path.name in REPORT_FILES:
            continue
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "method" in record:
            records[record["method"]] = record
    return records


def open_suite(name: str, root: Path | None = None, seed: int = 0) -> "Suite":
    """Build the named suite, or reuse it when root already holds it complete (default root: the user cache)."""
    from rankmerge.service.suites import SUITES, build_suite

    if name not in SUITES:
        raise MergeInputError(f"unknown suite {name!r}", f"use one of: {', '.join(SUITES)}")
    # resolved: job specs are written under the results folder and resolve relative paths against their own folder
    return build_suite(name, (Path(root) if root is not None else default_suite_root(name)).resolve(), seed=seed)
