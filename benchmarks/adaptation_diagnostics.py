"""Diagnostics of test-time adaptation on a benchmarked suite (docs/BENCHMARKS.md "Findings"); not a tuning tool.

Reads a finished `rankmerge bench run SUITE` (its results folder) and writes into OUT:
- entropy.json (--entropy): per task, test accuracy, mean prediction entropy, entropy on right / wrong predictions and
  the share of wrong predictions with entropy < 0.1, for the pretrained backbone, each individual model on its own task,
  and each adaptive method's step-0 and final (transductive) model;
- variants.json (--variants): AdaRank re-run from the bench's own transductive job spec with one change each (λ frozen,
  masks frozen, fewer steps), scored on test the same way, with the learned λ and ranks summarised.

Test labels are read only to score; nothing here chooses a setting of the benchmark.

    python benchmarks/adaptation_diagnostics.py digits --entropy --variants --out DIR
    python benchmarks/adaptation_diagnostics.py vision8 --root .bench/suites/vision8 --entropy --variants --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from rankmerge.service.bench.evaluate import SuiteEvaluator
from rankmerge.service.bench.layout import default_suite_root, open_suite
from rankmerge.service.spec import job_from_dict
from rankmerge.service.tta_job import run_adaptive_job
from rankmerge.workers.checkpoint_reader import ModelCheckpoint

ADAPTIVE = ("adamerging", "adarank_ta", "adarank_cart", "adarank_tsv_m", "adarank_iso_cts")
# name -> (factorization, parameter changes, steps; None = the suite's own)
VARIANTS: dict[str, dict[str, tuple[str, dict[str, Any], int | None]]] = {
    "digits": {"ta_lambda_frozen": ("ta", {"learn_lambda": False}, None), "ta_masks_frozen": ("ta", {"learn_masks": False}, None),
               "cart_lambda_frozen": ("cart", {"learn_lambda": False}, None), "cart_masks_frozen": ("cart", {"learn_masks": False}, None),
               "ta_250_steps": ("ta", {}, 250), "cart_250_steps": ("cart", {}, 250)},
    "vision8": {"cart_lambda_frozen": ("cart", {"learn_lambda": False}, None), "cart_masks_frozen": ("cart", {"learn_masks": False}, None),
                "ta_lambda_frozen": ("ta", {"learn_lambda": False}, None)},
}
KEYS = ("acc", "H", "H_right", "H_wrong")


def _mean(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {k: round(sum(r[k] for r in rows.values() if r[k] is not None) / len(rows), 4) for k in KEYS}


def stats(ev: SuiteEvaluator, weights: dict[str, torch.Tensor], only: int | None = None) -> dict[str, Any]:
    rows = {}
    for t, (ck, data) in enumerate(zip(ev.tasks, ev.data["test"])):
        if only is not None and t != only:
            continue
        with torch.no_grad():
            z = ev.models.logits(weights, t, data)
        h = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        right = z.argmax(-1) == data["labels"]
        wrong = int((~right).sum())
        rows[ck.name] = {"acc": round(right.float().mean().item(), 4), "H": round(h.mean().item(), 4),
                         "H_right": round(h[right].mean().item(), 4), "H_wrong": round(h[~right].mean().item(), 4) if wrong else None,
                         "wrong_confident": round(int(((~right) & (h < 0.1)).sum()) / max(1, wrong), 3)}
    return rows if only is not None else {**rows, "mean": _mean(rows)}


def weights_of(ev: SuiteEvaluator, path: Path) -> dict[str, torch.Tensor]:
    with ModelCheckpoint(path, "output") as ck:
        return {e.key: ck.read(e.key).float() for e in ev.plan.merged}


def summary(report: dict[str, Any], tasks: int) -> dict[str, Any]:
    lam = torch.tensor(report["lambda"])[:tasks]  # rows past the task count are not task coefficients
    ranks = report.get("learned_ranks") or {}
    count = sum(len(v[:tasks]) for v in ranks.values())
    return {"lambda_mean": round(lam.mean().item(), 3), "lambda_min": round(lam.min().item(), 3), "lambda_max": round(lam.max().item(), 3),
            "mean_rank": round(sum(sum(v[:tasks]) for v in ranks.values()) / count, 2) if count else None,
            "flips": sum(h["flips"] for h in report["history"]), "loss_first": report["history"][0]["loss"],
            "loss_last": report["history"][-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("suite")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--entropy", action="store_true")
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    suite = open_suite(args.suite, args.root)
    runs = (args.root or default_suite_root(args.suite)).resolve() / "results" / "runs"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with SuiteEvaluator(suite, {"test": {t: s["test"] for t, s in suite.data.items()}}) as ev:
        if args.entropy:
            report = {"pretrained": stats(ev, {e.key: ev.base.read(e.key).float() for e in ev.plan.merged})}
            own: dict[str, Any] = {}
            for t, ck in enumerate(ev.tasks):
                own.update(stats(ev, {e.key: ck.read(e.sources[t]).float() for e in ev.plan.merged}, only=t))
            report["individual"] = {**own, "mean": _mean(own)}
            for method in ADAPTIVE:
                report[f"{method} step0"] = stats(ev, weights_of(ev, runs / method / "step0"))
                report[f"{method} final"] = stats(ev, weights_of(ev, runs / method / "transductive"))
            (out / "entropy.json").write_text(json.dumps(report, indent=1))
            for name, rows in report.items():
                print(name, rows["mean"], flush=True)
        if args.variants:
            results = {}
            for name, (factorization, changes, steps) in VARIANTS.get(args.suite, {}).items():
                spec = yaml.safe_load((runs / f"adarank_{factorization}" / "transductive.yaml").read_text())
                steps = steps or spec["tta"]["steps"]
                spec["params"] = {**spec["params"], **changes}
                spec["tta"] = {**spec["tta"], "steps": steps, "checkpoint_every": steps}
                spec["output"] = str(out / name)
                (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))  # `rankmerge run` re-creates it
                start = time.perf_counter()
                report = run_adaptive_job(job_from_dict(spec, out))
                scores = stats(ev, weights_of(ev, out / name))
                results[name] = {"job": f"{name}.yaml", "steps": steps, "params": spec["params"], "acc": scores["mean"]["acc"],
                                 "H": scores["mean"]["H"], **summary(report, len(ev.tasks)), "per_task": scores,
                                 "wall_seconds": round(time.perf_counter() - start, 1)}
                print(name, {k: v for k, v in results[name].items() if k != "per_task"}, flush=True)
                (out / "variants.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
