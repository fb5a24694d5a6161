"""The AdaRank paper's Table 1 setting (CLIP ViT-B/32 or L/14, 8 tasks), from a local Hugging Face cache, on one GPU.

Inputs, all read from the cache (`$HF_HUB_CACHE`), never downloaded: the pretrained `openai/clip-<backbone>`,
FusionBench's 8 fine-tuned encoders `tanganke/clip-<backbone>_<task>` (bare `CLIPVisionModel` folders) and the 8 test
sets FusionBench evaluates on.
Each task is scored through its zero-shot head (class names and templates built in, computed once per job from the
pretrained CLIP model). Static rows run at each method's defaults; adaptive rows adapt on the unlabeled test inputs
(transductive, as in the papers) with the papers' lr and publish the final step — labels only score, nothing is tuned
on them. Prints the Table 1 layout, the paper's numbers beside ours (benchmarks/paper_table1.json), and writes
everything under --work.

    HF_HUB_CACHE=/path/to/hub bash benchmarks/paper_table1.sh [--backbone vit-large-patch14] [--steps 1000] [--work DIR]

Memory: every test set is held preprocessed in float32 (0.6 MB per 224x224 image; the 8 test sets of about 87,000
images are ~52 GB), once per job.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("vit-base-patch32", "vit-large-patch14")  # openai/clip-<backbone>, tanganke/clip-<backbone>_<task>
# task (built-in zero-shot head) -> (FusionBench's name for its fine-tuned encoder, the test set FusionBench scores it
# on, its configuration folder in that dataset repository)
TASKS: dict[str, tuple[str, str, str]] = {
    "sun397": ("sun397", "tanganke/sun397", ""),
    "stanford_cars": ("stanford-cars", "tanganke/stanford_cars", ""),
    "resisc45": ("resisc45", "tanganke/resisc45", ""),
    "eurosat": ("eurosat", "tanganke/eurosat", ""),
    "svhn": ("svhn", "ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": ("gtsrb", "tanganke/gtsrb", ""),
    "mnist": ("mnist", "ylecun/mnist", ""),
    "dtd": ("dtd", "tanganke/dtd", ""),
}
# Table 1's rows: (label, method, params, objective for adaptive rows)
ROWS: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("Task Arithmetic", "task_arithmetic", {}, None),
    ("TIES", "ties", {}, None),
    ("CART", "cart", {}, None),
    ("TSV-M", "tsv_m", {}, None),
    ("Iso-CTS", "iso_cts", {}, None),
    ("AdaMerging", "adamerging", {}, "entropy"),
    ("TA + AdaRank (paper: entropy)", "adarank", {"base": "ta_svd"}, "entropy"),
    ("TA + AdaRank (ours: distill)", "adarank", {"base": "ta_svd"}, "distill"),
    ("CART + AdaRank (paper: entropy)", "adarank", {"base": "cart"}, "entropy"),
    ("CART + AdaRank (ours: distill)", "adarank", {"base": "cart"}, "distill"),
]


def locate_inputs(backbone: str) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The cached snapshot of every input; anything missing is one error naming all of it."""
    from huggingface_hub import constants

    from rankmerge.service.model_ids import cached_model
    from rankmerge.workers.errors import MergeInputError

    clip = f"openai/clip-{backbone}"
    encoders = {task: f"tanganke/clip-{backbone}_{name}" for task, (name, _, _) in TASKS.items()}
    wanted = [("model", clip), *(("model", m) for m in encoders.values()),
              *(("dataset", d) for _, d, _ in TASKS.values())]
    found: dict[str, Path] = {}
    missing = []
    for kind, repo in wanted:
        try:
            found[repo] = cached_model(repo, repo, kind)
        except MergeInputError:
            missing.append(f"{kind} {repo}")
    if missing:
        raise MergeInputError(f"the Hugging Face cache at {constants.HF_HUB_CACHE} lacks {len(missing)} of the "
                              f"{len(wanted)} inputs: {', '.join(missing)}",
                              "fetch each with `hf download ID` (datasets: add `--repo-type dataset`), or set HF_HUB_CACHE "
                              "to the cache that holds them")
    models = {task: found[m] for task, m in encoders.items()}
    data = {task: found[d] / sub if sub else found[d] for task, (_, d, sub) in TASKS.items()}
    return found[clip], models, data


def spec_for(name: str, method: str, params: dict, objective: str | None, clip: Path, models: dict[str, Path],
             data: dict[str, Path], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "base": str(clip), "models": {t: str(p) for t, p in models.items()}, "method": method, "params": params,
        "heads": {t: {"zero_shot": {"dataset": t}} for t in models}, "output": str(work / name), "overwrite": True,
        "device": args.device,
    }
    if objective is not None:
        spec["tta"] = {"data": {t: str(p) for t, p in data.items()}, "steps": args.steps, "lr": args.lr,
                       "batch_size": args.batch_size, "objective": objective, "select": "final", "holdout": 0.0,
                       "checkpoint_every": max(args.steps // 4, 1), "eval_batch_size": args.eval_batch_size}
    return spec


def run_row(spec: dict[str, Any], path: Path, data: dict[str, Path], eval_batch: int) -> dict[str, Any]:
    """Run one job; its accuracy table (the adaptive job scores itself, a static one is scored after)."""
    from rankmerge.service.cli import main
    from rankmerge.service.spec import job_from_dict
    from rankmerge.service.tta_job import evaluate_output

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    if main(["run", str(path), *(["--restart"] if "tta" in spec else [])]) != 0:
        raise SystemExit(2)
    if "tta" in spec:
        return json.loads((Path(spec["output"]) / "merge_report.json").read_text())["accuracy"]
    return evaluate_output(job_from_dict(spec, path.parent), dict(data), eval_batch)


def table(results: dict[str, dict[str, Any]], paper: dict[str, float | None]) -> str:
    """Table 1's layout: one row per method, per-task accuracy (%), the average, and the paper's average."""
    tasks = list(TASKS)
    lines = ["| method | " + " | ".join(tasks) + " | **avg** | paper avg |", "|---" * (len(tasks) + 3) + "|"]
    first = next(iter(results.values()), None)
    reference = [("Pretrained (zero-shot)", "pretrained"), ("Individual", "individual")] if first else []
    for label, column in reference:
        cells = [f"{100 * first[t][column]:.1f}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{100 * first['average'][column]:.1f}** | "
                     f"{_paper(paper.get(label))} |")
    for label, acc in results.items():
        cells = [f"{100 * acc[t]['merged']:.1f}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{100 * acc['average']['merged']:.1f}** | "
                     f"{_paper(paper.get(label))} |")
    return "\n".join(lines)


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "paper_table1", help="specs, outputs, results")
    parser.add_argument("--steps", type=int, default=1000, help="adaptation steps (the final one is published)")
    parser.add_argument("--lr", type=float, default=1e-3, help="adaptation learning rate (the papers')")
    parser.add_argument("--batch-size", type=int, default=16, help="unlabeled test inputs per task and step")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--backbone", choices=BACKBONES, default=BACKBONES[0], help="CLIP ViT-B/32 or ViT-L/14")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default="", help="comma-separated row labels to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from rankmerge.workers.errors import MergeInputError

    try:
        clip, models, data = locate_inputs(args.backbone)
    except MergeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    paper = json.loads((ROOT / "benchmarks" / "paper_table1.json").read_text())["average"][args.backbone]
    chosen = {r.strip() for r in args.rows.split(",") if r.strip()}
    results: dict[str, dict[str, Any]] = {}
    for i, (label, method, params, objective) in enumerate(ROWS):
        if chosen and label not in chosen:
            continue
        spec = spec_for(f"row{i}_{method}", method, params, objective, clip, models, data, args.work, args)
        results[label] = run_row(spec, args.work / f"row{i}.yaml", data, args.eval_batch_size)
        (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results, paper))
    return 0


if __name__ == "__main__":
    sys.exit(main())
