#!/usr/bin/env bash
# The AdaRank paper's Table 1 (CLIP ViT-B/32, 8 tasks: Task Arithmetic, TIES, CART, TSV-M, Iso-CTS, AdaMerging,
# AdaRank on TA and CART with the paper's objective and ours) from a local Hugging Face cache, on one GPU. Needs in
# that cache: openai/clip-vit-base-patch32, FusionBench's 8 fine-tuned encoders and the 8 test sets (see
# benchmarks/paper_table1.py); without them it stops with one line naming what is missing.
#
#   HF_HUB_CACHE=/path/to/hub bash benchmarks/paper_table1.sh [--steps 1000] [--work .bench/paper_table1] [--rows LABELS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PY" benchmarks/paper_table1.py "$@"
