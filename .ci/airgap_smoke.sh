#!/usr/bin/env bash
# The air-gapped GPU install, rehearsed on any machine: a fresh venv that holds only torch, transformers, accelerate,
# safetensors and what they depend on (taken from the project venv, no download; no ray, deepspeed or pydantic), then
# the README's offline install from the `make gpu-wheels` folder (--no-index --no-deps), then the GPU check with every
# row on the CPU (GPU_CHECK_DEVICE=cpu): it must complete and print its table, the Ray row skipped with one line.
#   Usage: .ci/airgap_smoke.sh WHEELS [gpu_check.sh arguments]   (VENV=path of the project venv, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=$(cd "$1" && pwd -P)
shift
VENV=${VENV:-.venv}
PY=$(cd "$VENV" && pwd -P)/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. The GPU box's Python: torch & co. from the project venv, linked into one folder a .pth file puts on sys.path.
BASE_PY=$("$PY" -c 'import sys; print(sys._base_executable)')
"$BASE_PY" -m venv "$WORK/venv"
mkdir "$WORK/preinstalled"
"$PY" - "$WORK/preinstalled" <<'PYEOF'
import importlib.metadata as md, os, sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ABSENT = {"ray", "deepspeed", "pydantic", "pydantic-core", "rankmerge"}
todo, seen = ["torch", "transformers", "accelerate", "safetensors"], {}
while todo:
    name = canonicalize_name(todo.pop())
    if name in seen or name in ABSENT:
        continue
    seen[name] = dist = md.distribution(name)
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
out = Path(sys.argv[1])
for dist in seen.values():
    site = Path(dist.locate_file(""))
    for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        if (site / top).exists() and not (out / top).exists() and not top.endswith(".pth"):
            os.symlink(site / top, out / top)
print("preinstalled:", " ".join(sorted(seen)))
PYEOF
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$WORK/preinstalled" > "$SITE/preinstalled.pth"
PYW="$WORK/venv/bin/python"
for name in ray deepspeed pydantic rankmerge; do  # (from outside the checkout, whose rankmerge/ is no install)
    if (cd "$WORK" && "$PYW" -c "import $name" 2>/dev/null); then echo "FAIL: $name is importable before the install" >&2; exit 1; fi
done

# 2. The README's install, offline.
"$PYW" -m pip install -q --no-index --find-links "$WHEELS" --no-deps -r "$WHEELS/requirements.txt"
(cd "$WORK" && "$PYW" -c 'import torch, rankmerge.service.cli; print("torch", torch.__version__, "untouched; rankmerge from", rankmerge.__file__)')

# 3. The GPU check, every row on the CPU.
GPU_CHECK_DEVICE=cpu PYTHON="$PYW" benchmarks/gpu_check.sh --workdir "$WORK/check" "$@"
echo "air-gapped install: ok"
