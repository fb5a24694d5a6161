#!/usr/bin/env bash
# One GPU: the `gpu`-marked tests (CUDA against the CPU), then GPU vs CPU timings on the tiny models.
# Run from the repository root in the environment rankmerge is installed in (README: GPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA GPU: install its CUDA build (README: GPU machines)")'
"$PYTHON" -m pytest -q -m gpu tests/test_device.py
PYTHONPATH="${PYTHONPATH:-.}" "$PYTHON" benchmarks/gpu_check.py
