#!/usr/bin/env bash
# The built wheel, installed alone into a fresh venv and used from a folder outside the repository:
# `import rankmerge.workers, rankmerge.cluster, rankmerge.service` works, `import workers` (service, cluster) does not,
# and the installed `rankmerge` command merges two tiny models into an output AutoModel loads.
# The fresh venv reuses the project venv's third-party packages through a .pth file (no torch download); only the
# wheel itself is installed into it. Usage: .ci/wheel_smoke.sh   (VENV=path of the project venv, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$(cd "$VENV" && pwd -P)/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. Build the wheel from a copy of the source tree (what git tracks, plus new files it does not ignore), so no stale
#    build/ or egg-info of the checkout ends up in it.
mkdir "$WORK/src" "$WORK/dist"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src" 2>/dev/null || true
# setuptools >= 77 in the project venv: build with it, offline; otherwise pip fetches the build requirements.
if "$PY" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    ISOLATION=--no-build-isolation
else
    ISOLATION=
fi
"$PY" -m pip wheel -q --no-deps $ISOLATION -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/rankmerge-*.whl)
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
tops = {name.split("/")[0] for name in zipfile.ZipFile(sys.argv[1]).namelist()}
assert {t for t in tops if not t.endswith(".dist-info")} == {"rankmerge"}, f"the wheel installs {sorted(tops)}"
EOF
echo "built $(basename "$WHEEL"): only rankmerge/ at the top level"

# 2. A fresh venv of the same Python; the project venv's site-packages (not its .pth files, so not its editable
#    install of this checkout) are appended to sys.path.
BASE_PY=$("$PY" -c 'import sys; print(sys._base_executable)')
"$BASE_PY" -m venv "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# (site directories only: the checkout's own folders are never among them, and a .pth file listed this way does not
# run the project venv's .pth files, so its editable install of this checkout stays out)
"$PY" - > "$SITE/project-venv.pth" <<'EOF'
import sys
print("\n".join(path for path in sys.path if path.endswith(("site-packages", "dist-packages"))))
EOF
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEEL"

# 3. From a folder outside the repository.
mkdir "$WORK/outside"
cd "$WORK/outside"
PYW="$WORK/venv/bin/python"
"$PYW" -c "import rankmerge.workers, rankmerge.cluster, rankmerge.service"
"$PYW" - "$SITE" <<'EOF'
import sys
import rankmerge, rankmerge.service, rankmerge.workers, rankmerge.cluster
for module in (rankmerge, rankmerge.service, rankmerge.workers, rankmerge.cluster):
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} imported from {module.__file__}, not the wheel"
print("rankmerge imported from the installed wheel:", rankmerge.service.__file__)
EOF
for name in workers service cluster; do
    if "$PYW" -c "import $name" 2>/dev/null; then
        echo "FAIL: 'import $name' works: the wheel installs a top-level $name" >&2
        exit 1
    fi
done
echo "import workers / service / cluster: not installed (as it should be)"
"$PYW" -m rankmerge methods > /dev/null

# 4. A static merge of two tiny ViT fine-tunes with the installed console script; the output loads with AutoModel.
"$PYW" - <<'EOF'
import torch
from transformers import ViTConfig, ViTModel

torch.manual_seed(0)
config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                   patch_size=8)
base = ViTModel(config)
base.save_pretrained("base")
for i, name in enumerate(("a", "b")):
    tuned = ViTModel(config)
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * (i + 1) * torch.randn_like(p))
    tuned.save_pretrained(name)
EOF
"$WORK/venv/bin/rankmerge" merge --base base --model a=a --model b=b --method task_arithmetic --set lambda=0.5 --out merged
"$PYW" - <<'EOF'
import torch
from transformers import AutoModel

merged, base, a, b = (AutoModel.from_pretrained(p).state_dict() for p in ("merged", "base", "a", "b"))
assert merged.keys() == base.keys()
for key, value in merged.items():
    expected = base[key] + 0.5 * (a[key] - base[key]) + 0.5 * (b[key] - base[key])
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
print(f"merged output loads with AutoModel; {len(merged)} tensors = base + 0.5 (a - base) + 0.5 (b - base)")
EOF
echo "wheel smoke: ok"
