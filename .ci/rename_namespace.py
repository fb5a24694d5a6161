#!/usr/bin/env python3
"""Rewrite the old top-level module names `service`, `workers` and `cluster` to `rankmerge.service`,
`rankmerge.workers` and `rankmerge.cluster` (the folders stay where they are; pyproject maps them).

    python3 .ci/rename_namespace.py            # every tracked text file of the repository
    python3 .ci/rename_namespace.py FILE ...   # only these files (e.g. ones merged from a branch older than the move)
    python3 .ci/rename_namespace.py --check    # list what would change, exit 1 if anything would

Idempotent: a name already under `rankmerge.` is left alone. What it rewrites:
- `from service.x import y` / `import workers.y as z` / `from cluster import w` (any indentation, any file);
- `-m service.cli` (shell, docs) and `"-m", "service.cli"` (subprocess argument lists) -> `-m rankmerge`;
- a dotted module path anywhere (strings, logger names, suite registries, log lines in tests, docstrings):
  `service.<m>`, `workers.<m>`, `cluster.<m>` where <m> is a module or subpackage that exists in that folder
  (so `cluster.yaml`, a variable `workers.append` or a path `service/cli.py` are not touched);
- benchmarks/*.py: `sys.path.insert(0, ...)` lines are dropped (the package is installed; a script's own folder is
  on sys.path already), with the `# noqa: E402` they needed and `import sys` when nothing else uses it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLD = ("service", "workers", "cluster")
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".txt"}
NAMES = {"Makefile", "Dockerfile", "run"}
SKIP = {Path(__file__).resolve()}


def modules(folder: str) -> list[str]:
    """Module and subpackage names directly inside one of the old top-level folders."""
    root = REPO / folder
    found = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    found |= {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    return sorted(found, key=len, reverse=True)


DOTTED = re.compile("|".join(
    rf"(?<![\w.\-/]){folder}\.(?=(?:{'|'.join(map(re.escape, modules(folder)))})\b)" for folder in OLD))
IMPORT = re.compile(rf"^(\s*)(from|import)(\s+)({'|'.join(OLD)})(?=[\s.])", re.M)
DASH_M_LIST = re.compile(r"""(["']-m["']\s*,\s*["'])service\.cli(?=["'])""")
DASH_M = re.compile(r"(?<![\w.])-m\s+service\.cli\b")
README_IMPORT = re.compile(r"^from (?:rankmerge\.)?service import ((?:load|export)_task_model\b)", re.M)
SYS_PATH = re.compile(r"^sys\.path\.insert\(0, .*\)\n", re.M)


def rewrite(path: Path, text: str) -> str:
    text = DASH_M_LIST.sub(r"\1rankmerge", text)
    text = DASH_M.sub("-m rankmerge", text)
    if path.suffix == ".md":
        text = README_IMPORT.sub(r"from rankmerge import \1", text)
    text = IMPORT.sub(lambda m: f"{m[1]}{m[2]}{m[3]}rankmerge.{m[4]}", text)
    text = DOTTED.sub(lambda m: "rankmerge." + m[0], text)
    if path.parent.name == "benchmarks" and path.suffix == ".py" and SYS_PATH.search(text):
        text = SYS_PATH.sub("", text)
        text = re.sub(r"^((?:from|import) .*?)  # noqa: E402$", r"\1", text, flags=re.M)
        if not re.search(r"\bsys\.", text):
            text = re.sub(r"^import sys\n", "", text, flags=re.M)
    return text


def targets(args: list[str]) -> list[Path]:
    if args:
        return [Path(a).resolve() for a in args]
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True).stdout
    files = [REPO / p for p in listed.decode().split("\0") if p]
    return [p for p in files if p.is_file() and (p.suffix in SUFFIXES or p.name in NAMES)]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for path in targets([a for a in argv if a != "--check"]):
        if path in SKIP:
            continue
        text = path.read_text()
        new = rewrite(path, text)
        if new != text:
            changed.append(path)
            if not check:
                path.write_text(new)
        for line in new.splitlines():
            if re.match(r"\s*import rankmerge\.\S+\s*$", line):
                print(f"{path}: `{line.strip()}` binds the name `rankmerge`: check the uses", file=sys.stderr)
    for path in changed:
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
