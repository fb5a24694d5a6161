"""mergekit configs run by rankmerge and by mergekit 0.1.5 itself: the same YAML files, the same checkpoints.

    .venv/bin/python benchmarks/mergekit_configs.py [--workdir .bench] [--json results.json]

A small Llama family (service/tiny_models.py: real LlamaForCausalLM checkpoints, float32, a base and three seeded
fine-tunes, plus two seeded PEFT LoRA adapters on the base for `BASE+ADAPTER` references; linear, task_arithmetic
and ties configs) is merged once per config by `mergekit-yaml CONFIG OUT` in mergekit's own venv (benchmarks/venvs.py) and
by `rankmerge merge CONFIG --out OUT`. The table gives per config the max |rankmerge − mergekit| over every tensor of
the output, next to the largest |value|, and the tensors compared. mergekit's `dtype: float32` makes both compute in
float32; the remaining difference is summation order.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from measure import REPO  # benchmarks/ is on sys.path: this script's own directory
from venvs import ensure_venv

from rankmerge.service.tiny_models import make_family

LOG = logging.getLogger("mergekit_configs")
MERGEKIT_REQS = REPO / "benchmarks" / "mergekit-requirements.txt"
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 128}


def lora_adapters(base: Path, root: Path) -> list[Path]:
    """Two PEFT LoRA adapters on `base` with seeded factors (B = 0 at init would make them no change at all)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = []
    for seed in (1, 2):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"lora{seed}")
        adapters.append(root / f"lora{seed}")
    return adapters


def configs(base: Path, tasks: list[Path], adapters: list[Path]) -> dict[str, dict]:
    """The compared configs: per-model weights, top-level defaults, both normalisation rules, LoRA references."""
    t0, t1, t2 = (str(t) for t in tasks)
    l1, l2 = (f"{base}+{a}" for a in adapters)
    return {
        "task_arithmetic, LoRA refs BASE+ADAPTER and a full model": {
            "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
            "models": [{"model": l1, "parameters": {"weight": 0.5}}, {"model": l2, "parameters": {"weight": 0.8}},
                       {"model": t0, "parameters": {"weight": 0.3}}]},
        "ties, LoRA refs BASE+ADAPTER, density 0.4": {
            "merge_method": "ties", "base_model": str(base), "dtype": "float32", "parameters": {"density": 0.4, "weight": 0.7},
            "models": [{"model": l1}, {"model": l2}]},
        "task_arithmetic, weights 0.3/0.7/-0.2": {
            "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
            "models": [{"model": t0, "parameters": {"weight": 0.3}}, {"model": t1, "parameters": {"weight": 0.7}},
                       {"model": t2, "parameters": {"weight": -0.2}}]},
        "task_arithmetic, normalize, default weight 0.5": {
            "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
            "parameters": {"weight": 0.5, "normalize": True},
            "models": [{"model": t0}, {"model": t1, "parameters": {"weight": 1.5}}, {"model": t2}]},
        "ties, weights 0.6/1/0.3, densities 0.3/0.5/0.5 (normalised)": {
            "merge_method": "ties", "base_model": str(base), "dtype": "float32", "parameters": {"density": 0.5},
            "models": [{"model": t0, "parameters": {"weight": 0.6, "density": 0.3}},
                       {"model": t1, "parameters": {"weight": 1.0}}, {"model": t2, "parameters": {"weight": 0.3}}]},
        "ties, density 0.2, weight 0.3, normalize false, lambda 0.9": {
            "merge_method": "ties", "base_model": str(base), "dtype": "float32",
            "parameters": {"density": 0.2, "weight": 0.3, "normalize": False, "lambda": 0.9},
            "models": [{"model": t0}, {"model": t1}, {"model": t2}]},
        "linear, weights 1/2/0.5 (normalised)": {
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": t0, "parameters": {"weight": 1.0}}, {"model": t1, "parameters": {"weight": 2.0}},
                       {"model": t2, "parameters": {"weight": 0.5}}]},
        "linear, base listed with weight 2": {
            "merge_method": "linear", "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(base), "parameters": {"weight": 2.0}}, {"model": t0, "parameters": {"weight": 1.0}},
                       {"model": t1, "parameters": {"weight": 1.0}}]},
    }


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def compare(ours: Path, theirs: Path) -> dict:
    a, b = read_all(ours), read_all(theirs)
    common = sorted(set(a) & set(b))
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in common)
    scale = max(float(b[k].double().abs().max()) for k in common)
    return {"tensors": len(common), "only_rankmerge": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a)),
            "max_abs_diff": diff, "max_abs_value": scale}


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {done.returncode}); see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / ".bench")
    ap.add_argument("--rankmerge", default=str(Path(sys.executable).parent / "rankmerge"))
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.workdir.resolve() / "mergekit_configs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mergekit = ensure_venv("mergekit", MERGEKIT_REQS, args.workdir.resolve()).parent / "mergekit-yaml"
    base, tasks = make_family("llama", work / "models", sizes=SIZES)
    results = {}
    adapters = lora_adapters(base, work / "models")
    for n, (label, config) in enumerate(configs(base, list(tasks.values()), adapters).items()):
        cfg = work / f"config{n}.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        run([str(mergekit), str(cfg), str(work / f"mergekit{n}"), "--lora-merge-cache", str(work / "lora-cache")],
            work / f"mergekit{n}.log")
        run([args.rankmerge, "merge", str(cfg), "--out", str(work / f"rankmerge{n}")], work / f"rankmerge{n}.log")
        results[label] = compare(work / f"rankmerge{n}", work / f"mergekit{n}")
        LOG.info("%s: %s", label, results[label])
    print("| mergekit config | tensors | max abs(rankmerge - mergekit) | max abs(value) |\n|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['tensors']} | {r['max_abs_diff']:.2e} | {r['max_abs_value']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
