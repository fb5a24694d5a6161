"""LoRA adapter inputs: `rankmerge merge` on T PEFT adapters against the same merge of their merge_and_unload() full
models — wall time, peak RSS and max |difference| of the outputs.

    .venv/bin/python benchmarks/lora_inputs.py [--root .bench/lora-inputs] [--hidden 1024] [--layers 2] [--tasks 4] [--rank 16]

A Llama-shaped float32 base (intermediate 2.75 × hidden, vocabulary 4096) and T adapters made with `peft` on every
attention and MLP projection, with seeded factors (LoRA starts at B = 0; a trained adapter does not), saved next to
their merged full models. Each merge runs in its own process (`rankmerge merge`), one after the other; its wall time
and peak RSS are read from its merge_report.json. Synthetic weights: this measures cost and agreement, not quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(root: Path, hidden: int, layers: int, tasks: int, rank: int) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(2.75 * hidden), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=4096,
                         max_position_embeddings=256, tie_word_embeddings=False)
    names = [f"t{t}" for t in range(tasks)]
    adapters, full = {n: root / f"adapter-{n}" for n in names}, {n: root / f"full-{n}" for n in names}
    if (root / "base" / "config.json").exists() and all((full[n] / "config.json").exists() for n in names):
        return root / "base", adapters, full
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    for t, name in enumerate(names):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        model.save_pretrained(adapters[name])
        model.merge_and_unload().save_pretrained(full[name])
    return root / "base", adapters, full


def merge(base: Path, models: dict[str, Path], method: str, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "rankmerge"), "merge", "--base", str(base),
           *[a for n, p in models.items() for a in ("--model", f"{n}={p}")], "--method", method, "--out", str(out), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "merge_report.json").read_text())


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in y)


def rounding_sensitivity() -> str:
    """TSV-M of two rank-3 task vectors (64×48, k = 24 > 3): from the factors, densely, and densely after 1e-7 noise."""
    from rankmerge.workers.methods import spectral as sp

    gen = torch.Generator().manual_seed(0)
    factors = tuple((torch.randn(64, 3, generator=gen), torch.randn(3, 48, generator=gen)) for _ in range(2))
    taus = torch.stack([a @ b for a, b in factors])
    from_factors = sp.tsv_factorization(taus, low_rank=factors).materialize()
    dense = sp.tsv_factorization(taus).materialize()
    noisy = sp.tsv_factorization(taus + 1e-7 * torch.randn(taus.shape, generator=gen)).materialize()
    return (f"TSV-M below the rank: max |merge| {float(from_factors.abs().max()):.1f}; dense vs factors "
            f"{float((dense - from_factors).abs().max()):.1f}; dense vs dense with 1e-7 noise {float((dense - noisy).abs().max()):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=REPO / ".bench" / "lora-inputs")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", default="tsv_m,ta_svd,task_arithmetic")
    args = ap.parse_args()
    base, adapters, full = build(args.root / f"h{args.hidden}-l{args.layers}-t{args.tasks}-r{args.rank}", args.hidden, args.layers,
                                 args.tasks, args.rank)
    rows = ["| method | inputs | wall s | peak RSS GB | max abs diff vs full inputs |", "|---|---|---:|---:|---:|"]
    for method in args.methods.split(","):
        out = args.root / "out"
        ref = merge(base, full, method, out / f"{method}-full")
        got = merge(base, adapters, method, out / f"{method}-adapters")
        diff = max_difference(out / f"{method}-adapters", out / f"{method}-full")
        rows.append(f"| {method} | full (merge_and_unload) | {ref['wall_seconds']:.2f} | {ref['peak_rss_bytes'] / 1e9:.2f} | |")
        rows.append(f"| {method} | LoRA adapters | {got['wall_seconds']:.2f} | {got['peak_rss_bytes'] / 1e9:.2f} | {diff:.1e} |")
    print("\n".join(rows))
    print(rounding_sensitivity())


if __name__ == "__main__":
    main()
