"""The AdaRank paper's Table 1 setting (CLIP ViT-B/32, 8 tasks), from a local Hugging Face cache, on one GPU.

Inputs, all read from the cache (`$HF_HUB_CACHE`), never downloaded: the pretrained `openai/clip-vit-base-patch32`,
FusionBench's 8 fine-tuned encoders (bare `CLIPVisionModel` folders) and the 8 test sets FusionBench evaluates on.
Each task is scored through its zero-shot head (class names and templates built in, computed once per job from the
pretrained CLIP model). Static rows run at each method's defaults; adaptive rows adapt on the unlabeled test inputs
(transductive, as in the papers) with the papers' lr and publish the final step — labels only score, nothing is tuned
on them. Prints the Table 1 layout, the paper's numbers beside ours (benchmarks/paper_table1.json), and writes
everything under --work.

    HF_HUB_CACHE=/path/to/hub bash benchmarks/paper_table1.sh [--steps 1000] [--work .bench/paper_table1]
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
CLIP = "openai/clip-vit-base-patch32"
# task (built-in zero-shot head) -> (FusionBench's fine-tuned encoder, the test set FusionBench scores it on, its
# configuration folder in that dataset repository)
TASKS: dict[str, tuple[str, str, str]] = {
    "sun397": ("tanganke/clip-vit-base-patch32_sun397", "tanganke/sun397", ""),
    "stanford_cars": ("tanganke/clip-vit-base-patch32_stanford-cars", "tanganke/stanford_cars", ""),
    "resisc45": ("tanganke/clip-vit-base-patch32_resisc45", "tanganke/resisc45", ""),
    "eurosat": ("tanganke/clip-vit-base-patch32_eurosat", "tanganke/eurosat", ""),
    "svhn": ("tanganke/clip-vit-base-patch32_svhn", "ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": ("tanganke/clip-vit-base-patch32_gtsrb", "tanganke/gtsrb", ""),
    "mnist": ("tanganke/clip-vit-base-patch32_mnist", "ylecun/mnist", ""),
    "dtd": ("tanganke/clip-vit-base-patch32_dtd", "tanganke/dtd", ""),
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


def locate_inputs() -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The cached snapshot of every input; anything missing is one error naming all of it."""
    from huggingface_hub import constants

    from rankmerge.service.model_ids import cached_model
    from rankmerge.workers.errors import MergeInputError

    wanted = [("model", CLIP), *(("model", m) for m, _, _ in TASKS.values()), *(("dataset", d) for _, d, _ in TASKS.values())]
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
    models = {task: found[m] for task, (m, _, _) in TASKS.items()}
    data = {task: found[d] / sub if sub else found[d] for task, (_, d, sub) in TASKS.items()}
    return found[CLIP], models, data


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
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default="", help="comma-separated row labels to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from rankmerge.workers.errors import MergeInputError

    try:
        clip, models, data = locate_inputs()
    except MergeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    paper = json.loads((ROOT / "benchmarks" / "paper_table1.json").read_text())["average"]
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
