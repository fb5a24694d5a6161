#!/usr/bin/env bash
# One GPU, one table: the `gpu`-marked tests, TSV-M/TA static merges of 8 ViT-B/32-shaped checkpoints on the CPU and
# the GPU, AdaRank-TA and AdaMerging steps on the GPU (merge / forward / backward / mask-gradient split), the Ray
# executor against the in-process one, and a SIGKILL + --resume run against an uninterrupted one. ≤ 8 minutes on one
# GPU; downloads nothing (the checkpoints are written here, in .bench/gpu_check).
#
#   benchmarks/gpu_check.sh                        # from anywhere; PYTHON=... picks the interpreter (default python3)
#   GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh   # every row on the CPU in place of cuda: checks the script anywhere
#
# Needs a Python with torch (any CUDA build), transformers, accelerate, safetensors and rankmerge installed — also
# the air-gapped way: README, GPU machines. Without ray the Ray row is skipped with one line.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
PYTHON="${PYTHON:-python3}"
[[ "$PYTHON" == */* && "$PYTHON" != /* ]] && PYTHON="$PWD/$PYTHON"  # a relative path (.venv/bin/python) survives the cd
cd "${TMPDIR:-/tmp}"  # not the checkout: its rankmerge/ folder would shadow the installed package
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
# Preflight, one line on what is missing. --no-deps installs skip rankmerge's own requirements: check them here, not
# in the middle of the table.
"$PYTHON" - "$DEVICE" <<'PREFLIGHT'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "accelerate", "safetensors", "pytest", "rankmerge") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"{sys.executable} cannot import {', '.join(missing)}: install them (README: GPU machines)")
try:
    import rankmerge.service.cli
except ImportError as exc:
    sys.exit(f"rankmerge cannot start under {sys.executable} ({exc}): install what it lacks (README: GPU machines)")
import torch, transformers
if int(transformers.__version__.split(".")[0]) < 5:
    sys.exit(f"transformers {transformers.__version__} is older than rankmerge needs (5.0 or newer): install a newer wheel")
if sys.argv[1].startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU: install its CUDA build (README: GPU machines), or run with GPU_CHECK_DEVICE=cpu")
PREFLIGHT
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" --device "$DEVICE" "$@"
