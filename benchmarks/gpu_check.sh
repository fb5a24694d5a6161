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
if [[ "$DEVICE" == cuda* ]]; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA GPU: install its CUDA build (README: GPU machines), or run with GPU_CHECK_DEVICE=cpu")'
fi
"$PYTHON" -c 'import rankmerge.service.cli, pytest' 2>/dev/null \
    || { echo "rankmerge or pytest is not importable by $PYTHON: install them (README: GPU machines)" >&2; exit 1; }
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" --device "$DEVICE" "$@"
