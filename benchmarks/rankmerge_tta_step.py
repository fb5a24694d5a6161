"""rankmerge's side of benchmarks/tta_step.py: time AdaRank / AdaMerging steps of the engine on the shared fixture.

    .venv/bin/python benchmarks/rankmerge_tta_step.py --models FIXTURE --tasks 8 --batch 16 --steps 3 --warmup 1 \
        --threads 2 --json-out OUT.json [--method adarank|adamerging] [--factorization ta] [--no-cache]

The fixture's task models are bare CLIPVisionModel checkpoints with CLIP zero-shot heads in heads.safetensors, so the
loss is written here the way FusionBench computes it (normalised projected pooled feature @ class embeddings ×
exp(logit_scale)); the merge, its backward and the optimizer are the engine's own (workers/tta).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import CLIPVisionConfig, CLIPVisionModel

from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.memory import peak_rss_bytes
from rankmerge.workers.tta.objectives import entropy as mean_entropy
from rankmerge.workers.plan import build_plan
from rankmerge.workers.tta.adapters import checkpoint_to_module_names
from rankmerge.workers.methods.registry import MergeContext
from rankmerge.workers.tta.engine import AdaptiveMerger, AdaptiveOptions
from rankmerge.workers.tta.params import AdaMergingParams, AdaRankParams
from rankmerge.workers.tta.state import StateOptions, build_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path, required=True)
    ap.add_argument("--method", choices=["adarank", "adamerging"], default="adarank")
    ap.add_argument("--factorization", choices=["ta", "cart", "tsv_m", "iso_cts"], default="ta")
    ap.add_argument("--no-cache", action="store_true", help="rebuild each merged matrix with one GEMM (less memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    heads = load_file(str(args.models / "heads.safetensors"))
    inputs = load_file(str(args.models / "inputs.safetensors"))
    with ExitStack() as stack:
        base = stack.enter_context(ModelCheckpoint(args.models / "base", "base"))
        tasks = [stack.enter_context(ModelCheckpoint(args.models / f"task_{t}", f"task_{t}")) for t in range(args.tasks)]
        plan = build_plan(base, {t.name: t for t in tasks})
        params = (AdaRankParams.model_validate({"factorization": args.factorization, "lambda": 0.3}) if args.method == "adarank"
                  else AdaMergingParams.model_validate({"lambda": 0.3}))
        method = params.method(MergeContext(tuple(t.name for t in tasks), plan.merged_numel))
        slots, lam = build_state(plan, base, tasks, method, StateOptions())
    options = AdaptiveOptions(learn_masks=args.method == "adarank", cache_masked=not args.no_cache)
    merger = AdaptiveMerger(slots, lam, options)
    config = CLIPVisionConfig.from_pretrained(args.models / "base")
    with init_empty_weights(include_buffers=False):  # meta parameters, real buffers (position ids)
        model = CLIPVisionModel(config)
    model.eval()
    rename = checkpoint_to_module_names(model)
    to_module = {e.key: rename(e.key) for e in plan.merged}
    setup_s = time.perf_counter() - start

    def loss_of(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        params = {to_module[k]: w for k, w in weights.items()}
        total = 0.0
        for t in range(args.tasks):
            pooled = functional_call(model, params, args=(), kwargs={"pixel_values": inputs[f"images.task_{t}"]}).pooler_output
            feats = torch.nn.functional.normalize(pooled @ heads["visual_projection.weight"].T, dim=-1)
            total = total + mean_entropy(heads["logit_scale"].exp() * feats @ heads[f"heads.task_{t}"].T)
        return total

    steps = []
    for i in range(args.warmup + args.steps):
        merger.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        weights = merger.merged_weights()
        t1 = time.perf_counter()
        loss = loss_of(weights)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        merger.optimizer.step()
        t4 = time.perf_counter()
        if i >= args.warmup:
            steps.append({"total": t4 - t0, "merge": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3,
                          "loss": float(loss.detach())})
    result = {"runner": f"rankmerge {args.method}" + (f" ({args.factorization})" if args.method == "adarank" else ""),
              "steps": steps, "setup_s": setup_s,
              "peak_rss_bytes": peak_rss_bytes(),
              "meta": {"cache_masked": not args.no_cache, "threads": args.threads}}
    args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
