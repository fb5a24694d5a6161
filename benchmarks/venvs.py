"""Private virtualenvs for the tools the benchmarks compare rankmerge against.

Each competitor (mergekit, FusionBench, ...) pins its own torch/transformers, and those
pins must never touch the project's .venv, so every tool gets a venv of its own under
<workdir>/venvs/<name>, built once from a requirements file and reused afterwards.

    from venvs import ensure_venv
    python = ensure_venv("mergekit", REPO / "benchmarks" / "mergekit-requirements.txt", work)
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

LOG = logging.getLogger("venvs")
STAMP = ".rankmerge-requirements"  # copy of the requirements a finished build installed


def _torch_pins(requirements: Path) -> list[str]:
    """The file's own torch line(s), installed before everything else.

    torch==X alone resolves to the local CPU wheel; letting a tool's resolver pick
    torch instead can pull gigabytes of CUDA wheels.
    """
    lines = (ln.split("#", 1)[0].strip() for ln in requirements.read_text().splitlines())
    return [ln for ln in lines if re.match(r"torch\s*(==|>=|<=|~=|<|>|$)", ln)]


def ensure_venv(name: str, requirements: Path, workdir: Path) -> Path:
    """Return the python of <workdir>/venvs/<name>, (re)building it if needed.

    A venv is reused only when a previous build finished with exactly this
    requirements file (the stamp is written last), so an interrupted build or an
    edited pin is redone instead of silently measuring the wrong versions.
    """
    venv = Path(workdir) / "venvs" / name
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    wanted = requirements.read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    LOG.info("building %s venv in %s (one-off, a few minutes)", name, venv)
    python3 = shutil.which("python3") or sys.executable
    subprocess.run([python3, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    if torch := _torch_pins(requirements):
        subprocess.run(pip + torch, check=True)
    subprocess.run(pip + ["-r", str(requirements)], check=True)
    stamp.write_text(wanted)
    return python
