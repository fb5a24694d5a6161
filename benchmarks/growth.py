"""How rankmerge's time and memory grow with the number of tasks and the model size, fitted, with the measured
points — and how close `--dry-run`'s forecast came to each measured run.

For every method and every point (the first T task models of a set, or one set per model size), it runs
`rankmerge merge ... --dry-run` (the forecast) and then the merge itself in a fresh subprocess (wall time, ru_maxrss),
then fits wall = a + b·x and peak = c + d·x by least squares, x = tasks (or merged parameters × tasks for size).

    .venv/bin/python benchmarks/growth.py --models .bench/scale/vitl --tasks 2,5,10,20 \\
        --methods task_arithmetic,ties,tsv_m:svd=randomized --json .bench/scale/growth.json
    .venv/bin/python benchmarks/growth.py --sizes vitl6=.bench/scale/vitl6,vitl12=.bench/scale/vitl12,vitl=.bench/scale/vitl \\
        --tasks 8 --methods task_arithmetic

Method syntax: NAME[:key=value[;key=value]] (rankmerge parameters). Checkpoint sets come from
benchmarks/scale_models.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from measure import flush, measure, wait_quiet

LOG = logging.getLogger("growth")
REPO = Path(__file__).resolve().parent.parent
RANKMERGE = str(REPO / ".venv" / "bin" / "rankmerge")
GIB = 2**30


def task_dirs(models: Path) -> list[Path]:
    dirs = sorted((d for d in models.iterdir() if (d / "config.json").exists() and d.name != "base"),
                  key=lambda d: int(re.sub(r"\D", "", d.name) or 0))
    if not dirs:
        sys.exit(f"{models} holds no task models: generate them with benchmarks/scale_models.py")
    return dirs


def parse_method(text: str) -> tuple[str, list[str]]:
    name, _, params = text.partition(":")
    return name, [p for p in params.split(";") if p]


def merge_command(models: Path, tasks: int, method: str, params: list[str], out: Path) -> list[str]:
    cmd = [RANKMERGE, "merge", "--base", str(models / "base"), "--method", method, "--out", str(out), "--overwrite"]
    for d in task_dirs(models)[:tasks]:
        cmd += ["--model", f"{d.name}={d}"]
    for p in params:
        cmd += ["--set", p]
    return cmd


def forecast(cmd: list[str], log: Path) -> dict[str, float]:
    """The dry run's predicted seconds and peak bytes (and how long the dry run itself took)."""
    run = measure(cmd + ["--dry-run"], log, dict(os.environ))
    run.exit_unless_ok(cmd, log)
    text = log.read_text()
    seconds = float(re.search(r"predicted wall time: ([\d.]+) s", text).group(1))
    gib = float(re.search(r"predicted peak memory: ([\d.]+) GiB", text).group(1))
    return {"predicted_s": seconds, "predicted_peak": gib * GIB, "dry_run_s": run.wall}


def merged_params(models: Path) -> int:
    """Entries of one model's weights (from the safetensors headers)."""
    from rankmerge.workers.checkpoint_reader import ModelCheckpoint

    with ModelCheckpoint(models / "base", "base") as ck:
        return sum(int(np.prod(s)) for s in ck.shapes.values())


def measure_point(models: Path, tasks: int, method: str, params: list[str], work: Path, quiet_s: float) -> dict:
    out = work / "out"
    cmd = merge_command(models, tasks, method, params, out)
    flush()
    wait_quiet(quiet_s)
    row = {"models": str(models), "tasks": tasks, "method": method, "params": params, "model_params": merged_params(models)}
    row.update(forecast(cmd, work / "dry-run.log"))
    flush()
    wait_quiet(quiet_s)
    run = measure(cmd, work / "merge.log", dict(os.environ))
    run.exit_unless_ok(cmd, work / "merge.log")
    row.update({"wall_s": run.wall, "peak_rss": run.rss, "background_cores": run.background})
    shutil.rmtree(out, ignore_errors=True)
    LOG.info("%s T=%d: %.1f s (predicted %.1f), %.2f GiB (predicted %.2f)", method, tasks, run.wall, row["predicted_s"],
             run.rss / GIB, row["predicted_peak"] / GIB)
    return row


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b·x; returns (a, b, R²)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 2:
        return float(y[0]) if len(y) else 0.0, 0.0, 1.0
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    total = ((y - y.mean()) ** 2).sum()
    return float(a), float(b), float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0


def report(rows: list[dict], axis: str) -> str:
    lines = ["| method | model | tasks | wall s | predicted s | error | peak GiB | predicted GiB | error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = r["method"] + (" " + " ".join(r["params"]) if r["params"] else "")
        lines.append(f"| {label} | {Path(r['models']).name} | {r['tasks']} | {r['wall_s']:.1f} | {r['predicted_s']:.1f} | "
                     f"{(r['predicted_s'] - r['wall_s']) / r['wall_s']:+.0%} | {r['peak_rss'] / GIB:.2f} | "
                     f"{r['predicted_peak'] / GIB:.2f} | {(r['predicted_peak'] - r['peak_rss']) / r['peak_rss']:+.0%} |")
    lines.append("")
    unit = "task" if axis == "tasks" else "G entries (params × tasks)"
    for method in dict.fromkeys((r["method"], tuple(r["params"])) for r in rows):
        points = [r for r in rows if (r["method"], tuple(r["params"])) == method]
        xs = [r["tasks"] if axis == "tasks" else r["model_params"] * r["tasks"] / 1e9 for r in points]
        a, b, r2 = fit(xs, [r["wall_s"] for r in points])
        c, d, q2 = fit(xs, [r["peak_rss"] / GIB for r in points])
        name = method[0] + (" " + " ".join(method[1]) if method[1] else "")
        lines.append(f"- {name}: wall ≈ {a:.1f} s + {b:.2f} s per {unit} (R² {r2:.3f}); "
                     f"peak ≈ {c:.2f} GiB + {d:.3f} GiB per {unit} (R² {q2:.3f})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, help="one checkpoint set: grow the number of tasks")
    ap.add_argument("--sizes", help="LABEL=DIR,...: one set per model size, each at the (single) --tasks count")
    ap.add_argument("--tasks", default="2,5,10,20")
    ap.add_argument("--methods", default="task_arithmetic")
    ap.add_argument("--work", type=Path, default=REPO / ".bench" / "growth")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quiet-wait", type=float, default=180.0, help="seconds to wait for other work to stop before each run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if bool(args.models) == bool(args.sizes):
        sys.exit("give either --models DIR (grow tasks) or --sizes LABEL=DIR,... (grow the model)")
    counts = [int(t) for t in args.tasks.split(",")]
    sets = [args.models.resolve()] if args.models else [Path(p.split("=", 1)[1]).resolve() for p in args.sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for text in args.methods.split(","):
        method, params = parse_method(text)
        for models in sets:
            for tasks in counts:
                rows.append(measure_point(models, tasks, method, params, args.work, args.quiet_wait))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(report(rows, "tasks" if args.models else "size"))


if __name__ == "__main__":
    main()
