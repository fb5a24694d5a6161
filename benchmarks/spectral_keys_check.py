"""Reproduction check: rankmerge's tsv_m, iso_c and iso_cts with `spectral_keys: all_2d` against FusionBench 0.2.33's
own TaskSingularVectorMerging, ISO_C_Merge and ISO_CTS_Merge, on the same small float32 checkpoints, every key.

    .venv/bin/python benchmarks/spectral_keys_check.py [--root .bench/spectral-keys] [--layers 2] [--tasks 3] \
        [--spectral-keys blocks]   # the control: today's default, embeddings averaged

Two families, written here from seeded real HF classes (a CLIP vision encoder and a Llama causal LM, `--layers` blocks,
hidden size `--hidden`): a base and `--tasks` models that are the base plus seeded low-rank and dense changes
(service/tiny_models.perturb_). FusionBench runs in its own venv (benchmarks/fusionbench_merge.py, CLIPVisionModelPool
/ CausalLMPool in float32); rankmerge runs `rankmerge merge` with the matched parameters. The table gives, per family
and method, the max |rankmerge − FusionBench| over every float tensor of the model, the key where it occurs, and the
largest |value| of that tensor (the scale the difference is measured against). Nothing here uses data or labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from measure import REPO, tensor_index  # benchmarks/ is on sys.path
from scale_models import add_prefix
from venvs import ensure_venv

LOG = logging.getLogger("spectral_keys_check")
WRAPPER = "vision_model."  # transformers 4 (FusionBench's) writes CLIP vision names with it, 5 without: one tensor
METHODS = {  # rankmerge parameters, FusionBench parameters (its names)
    "tsv_m": ({"alpha": 1.0, "spectral_keys": "all_2d"}, {"alpha": 1.0, "exclude_keys": []}),
    "iso_c": ({"alpha": 1.0, "spectral_keys": "all_2d"}, {"scaling_factor": 1.0}),
    "iso_cts": ({"alpha": 1.0, "common_fraction": 0.8, "spectral_keys": "all_2d"},
                {"scaling_factor": 1.0, "common_space_fraction": 0.8}),
}


def families(layers: int, hidden: int) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    return {
        "clip_vision": lambda: CLIPVisionModel(CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                                               intermediate_size=2 * hidden, image_size=32, patch_size=8)),
        "causal_lm": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                          max_position_embeddings=64, tie_word_embeddings=False)),
    }


def write_family(make, root: Path, tasks: int, prefix: str) -> tuple[Path, dict[str, Path]]:
    """A base and `tasks` perturbed copies, float32 safetensors (kept when present), names under `prefix` (the CLIP
    layout both transformers versions read: scale_models.py's docstring)."""
    from rankmerge.service.tiny_models import perturb_

    dirs = {f"t{t}": root / f"t{t}" for t in range(tasks)}
    if all((d / "config.json").exists() for d in [root / "base", *dirs.values()]):
        return root / "base", dirs
    torch.manual_seed(0)
    base = make()
    base.save_pretrained(root / "base")
    add_prefix(root / "base", prefix)
    for t, d in enumerate(dirs.values()):
        model = make()
        model.load_state_dict(base.state_dict())
        perturb_(model, seed=t + 1)
        model.save_pretrained(d)
        add_prefix(d, prefix)
    return root / "base", dirs


def run_fusionbench(python: Path, pool: str, base: Path, models: dict[str, Path], method: str, params: dict, out: Path) -> None:
    cmd = [str(python), str(REPO / "benchmarks" / "fusionbench_merge.py"), "--pool", pool, "--dtype", "float32",
           "--base", str(base), *[a for n, p in models.items() for a in ("--model", f"{n}={p}")], "--method", method,
           *[a for k, v in params.items() for a in ("--param", f"{k}={json.dumps(v)}")], "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_rankmerge(base: Path, models: dict[str, Path], method: str, params: dict, out: Path) -> None:
    cmd = [str(Path(sys.executable).parent / "rankmerge"), "merge", "--base", str(base),
           *[a for n, p in models.items() for a in ("--model", f"{n}={p}")], "--method", method,
           *[a for k, v in params.items() for a in ("--set", f"{k}={v}")], "--out", str(out), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def max_difference(ours: Path, theirs: Path) -> tuple[float, str, float, int]:
    """(max |a − b| over every float key, its key, max |b| of that key, keys compared); a missing key is an error."""
    a, b = (
        {k.removeprefix(WRAPPER): v for f in sorted(set(tensor_index(d).values())) for k, v in load_file(str(f)).items()}
        for d in (ours, theirs))
    keys = [k for k in b if b[k].is_floating_point()]
    missing = [k for k in keys if k not in a]
    if missing:
        raise SystemExit(f"rankmerge's output lacks {missing[:3]}")
    worst, where = 0.0, keys[0]
    for k in keys:
        d = float((a[k].double() - b[k].double()).abs().max())
        if d >= worst:
            worst, where = d, k
    return worst, where, float(b[where].abs().max()), len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=REPO / ".bench" / "spectral-keys")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--spectral-keys", choices=("all_2d", "blocks"), default="all_2d",
                    help="rankmerge's setting (blocks: the control, embeddings averaged instead of factorized)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    python = ensure_venv("fusionbench", REPO / "benchmarks" / "fusionbench-requirements.txt", REPO / ".bench")
    rows = ["| family | method | keys | max abs diff | at key | max abs value there |", "|---|---|---|---|---|---|"]
    for pool, make in families(args.layers, args.hidden).items():
        base, models = write_family(make, args.root / f"{pool}-{args.layers}l", args.tasks, WRAPPER if pool == "clip_vision" else "")
        for method, (ours, theirs) in METHODS.items():
            out = args.root / "out" / f"{pool}-{method}"
            run_fusionbench(python, pool, base, models, method, theirs, out / "fusionbench")
            run_rankmerge(base, models, method, {**ours, "spectral_keys": args.spectral_keys}, out / "rankmerge")
            diff, key, scale, count = max_difference(out / "rankmerge", out / "fusionbench")
            LOG.info("%s %s: max |diff| %.2e at %s (max |value| %.2e) over %d keys", pool, method, diff, key, scale, count)
            rows.append(f"| {pool} | {method} | {count} | {diff:.1e} | `{key}` | {scale:.2f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
