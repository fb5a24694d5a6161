"""Every module of the `rankmerge` package (rankmerge/ and the three folders it maps: service/, workers/, cluster/)
imports on its own, first, in a fresh interpreter; no import circle exists, not even one hidden behind a function-local
import (those break as soon as someone moves the import to the top); nothing imports the folders as top-level modules;
and pyproject lists every package."""

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Installed name -> folder in the repository (pyproject's [tool.setuptools.package-dir]).
PACKAGES = {"rankmerge": "rankmerge", "rankmerge.service": "service", "rankmerge.workers": "workers",
            "rankmerge.cluster": "cluster"}
OLD_TOP_LEVEL = {"service", "workers", "cluster"}  # importable only from the repository root, never installed

# One fresh interpreter imports every module once (so the third-party libraries they need are loaded once), forgets
# the project's own modules, then forks a child per module: each child starts with none of the project's modules
# loaded and imports its module first, exactly as `python -c "import X"` would.
IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    packages, names = tuple(sys.argv[1].split(",")), sys.argv[2:]
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            pass  # reported by its own child below
    for loaded in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[loaded]
    failed = []
    for name in names:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(name)
    print("failed:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module in the packages (a package by its __init__.py)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            out[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return out


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports anywhere in it (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(c for c in candidates if c in known)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a path (first module repeated at the end), or [] when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_no_import_circle():
    modules = module_names()
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    assert find_cycle(graph) == []


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(module_names())
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH, "rankmerge", *names], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]


def python_files() -> list[Path]:
    """The project's Python files: the package folders, tests and benchmarks."""
    folders = [*PACKAGES.values(), "tests", "benchmarks"]
    return [path for folder in folders for path in sorted((REPO / folder).rglob("*.py"))]


def test_nothing_imports_the_folders_as_top_level_modules():
    old = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            old += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in OLD_TOP_LEVEL]
    assert old == [], "import rankmerge.service/workers/cluster instead: " + ", ".join(old)


def test_pyproject_lists_every_package_under_its_folder():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == PACKAGES
    packages = {name for name, path in module_names().items() if path.name == "__init__.py"}
    assert sorted(setuptools["packages"]) == sorted(packages)
