#!/usr/bin/env bash
# Every scale measurement behind docs/PERFORMANCE.md ("Scale"), one after another: on 2 cores two runs at once
# would measure each other. Outputs (tables, JSON, logs) go to $OUT (default .bench/scale/res).
#
#   bash benchmarks/scale_all.sh            # all of it (about an hour on an idle 2-core machine)
#   bash benchmarks/scale_all.sh anchors-vitl growth-size   # only the named steps
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-.bench/scale/res}
QUIET=${QUIET:-60}
mkdir -p "$OUT"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

step() {  # step NAME COMMAND...: run unless steps were named and this is not one of them
    local name=$1
    shift
    if [ -n "${SELECTED:-}" ] && [[ " $SELECTED " != *" $name "* ]]; then return 0; fi
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt"
}
SELECTED="$*"

$PY benchmarks/scale_models.py vitl --tasks 20 --out .bench/scale/vitl
$PY benchmarks/scale_models.py llama1b --tasks 8 --out .bench/scale/llama1b

# rankmerge vs the anchors, same checkpoints (elementwise methods on the full models)
step anchors-vitl $PY benchmarks/anchors.py --model vitl --tasks 20 --methods task_arithmetic,ties,dare \
    --quiet-wait "$QUIET" --timeout 1800 --json "$OUT/anchors-vitl.json"
step anchors-llama $PY benchmarks/anchors.py --model llama1b --tasks 8 --methods task_arithmetic,ties,dare \
    --quiet-wait "$QUIET" --timeout 1800 --json "$OUT/anchors-llama.json"
# spectral methods: an exact SVD of every task vector of 20 full ViT-L models takes each tool about an hour on 2
# cores, so the side by side uses the ViT-L widths with 4 of the 24 layers (time is linear in layers; growth-size)
step anchors-vitl-4l $PY benchmarks/anchors.py --model vitl --tasks 20 --layers 4 --methods tsv_m,iso_c \
    --rankmerge-extra tsv_m:svd=randomized --quiet-wait "$QUIET" --timeout 1800 --json "$OUT/anchors-vitl-4l.json"

# rankmerge alone (what the anchors lack, or cannot fit), each checked against its --dry-run forecast
step full-vitl $PY benchmarks/growth.py --models .bench/scale/vitl --tasks 20 \
    --methods "tsv_m:svd=randomized,cart:svd=randomized" --quiet-wait "$QUIET" --json "$OUT/full-vitl.json"
step full-llama $PY benchmarks/growth.py --models .bench/scale/llama1b --tasks 8 \
    --methods "tsv_m:svd=randomized" --quiet-wait "$QUIET" --json "$OUT/full-llama.json"

# growth with the number of tasks and with the model size, fitted
step growth-tasks $PY benchmarks/growth.py --models .bench/scale/vitl --tasks 2,5,10,20 \
    --methods "task_arithmetic,tsv_m:svd=randomized" --quiet-wait "$QUIET" --json "$OUT/growth-tasks.json"
step growth-size $PY benchmarks/growth.py --sizes vitl4=.bench/scale/vitl-4l,vitl=.bench/scale/vitl,llama1b=.bench/scale/llama1b \
    --tasks 8 --methods task_arithmetic --quiet-wait "$QUIET" --json "$OUT/growth-size.json"

# the SVD phase with 1 and 2 SpectralShard actors
step svd-scaling $PY benchmarks/distributed.py --svd-only --models .bench/scale/vitl --tasks 4 \
    --params '{"max_rank": 64, "svd": "randomized", "factor_dtype": "bfloat16"}' --workdir .bench/scale/svd-scaling

# AdaRank: 20 x ViT-L (in-process, forecast vs measured) and 8 x 1.1B Llama (2 shards, ZeRO-3 group of 2 CPU workers)
step adarank-vitl $PY benchmarks/vitl_adarank.py --tasks 20 --steps 3 --quiet-wait "$QUIET"
step adarank-llama $PY benchmarks/llm_adarank.py --models .bench/scale/llama1b --factorization ta
