"""What each test-time objective costs, side by side in one run on one suite: the one-off teacher pass, seconds per
step (median), the guard's seconds per evaluation, and the ratio of each objective's step to the entropy step.

Each objective runs the same AdaRank-TA job (in-process executor, same steps/batch/seed) from a fresh job dir; the
objectives take turns for `--rounds` rounds and each figure is the best round (neighbours' load only adds time).
The guard is timed as the wall-time difference between `distill` and `distill` with `holdout: 0` (no guard).

    python benchmarks/objective_cost.py digits-smoke --steps 60
    python benchmarks/objective_cost.py shift5 --root DIR --steps 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rankmerge.service.bench.layout import default_suite_root
from rankmerge.service.spec import job_from_dict
from rankmerge.service.suites import build_suite
from rankmerge.service.tta_job import run_adaptive_job

RUNS = (("entropy", {"objective": "entropy"}), ("infomax", {"objective": "infomax"}), ("distill", {"objective": "distill"}),
        ("distill, no guard", {"objective": "distill", "holdout": 0.0}))


def measure(suite, root: Path, name: str, tta: dict, steps: int, batch: int) -> dict:
    spec = {"base": str(suite.base_dir), "models": {t: str(p) for t, p in suite.task_dirs.items()}, "method": "adarank",
            "params": {"factorization": "ta", "lambda": 0.3}, "output": str(root / "out"), "overwrite": True,
            "tta": {"data": {t: str(s["test"]) for t, s in suite.data.items()}, "steps": steps, "lr": 1e-3,
                    "batch_size": batch, "checkpoint_every": max(steps // 4, 1), "evaluate": False, **tta}}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = time.perf_counter()
    report = run_adaptive_job(job_from_dict(spec, root))
    wall = time.perf_counter() - start
    timing = report["timing"]
    return {"objective": name, "wall_s": round(wall, 2), "teacher_s": timing["teacher_seconds"],
            "step_s": round(statistics.median(timing["step_seconds"]), 4),
            "guard_points": len((report["guard"] or {}).get("curve", []))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite")
    ap.add_argument("--root", type=Path, help="suite folder (default: the bench's suite cache)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    suite = build_suite(args.suite, args.root or default_suite_root(args.suite))
    runs: dict[str, list[dict]] = {name: [] for name, _ in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, tta in RUNS:
                folder = Path(tmp) / name.replace(", ", "_").replace(" ", "_")
                runs[name].append(measure(suite, folder, name, tta, args.steps, args.batch))
    rows = [{**min(found, key=lambda r: r["wall_s"]), "step_s": min(r["step_s"] for r in found),
             "teacher_s": min(r["teacher_s"] for r in found)} for found in runs.values()]
    base = rows[0]["step_s"]
    guarded, unguarded = rows[2], rows[3]
    guard_s = (guarded["wall_s"] - unguarded["wall_s"]) / max(guarded["guard_points"], 1)
    print(f"suite {args.suite}, {len(suite.task_dirs)} tasks, AdaRank-TA, {args.steps} steps, batch {args.batch}/task")
    print(f"{'objective':<20}{'teacher pass s':>16}{'s/step':>10}{'vs entropy':>12}{'wall s':>10}")
    for r in rows:
        print(f"{r['objective']:<20}{r['teacher_s']:>16.2f}{r['step_s']:>10.4f}{r['step_s'] / base:>11.2f}x{r['wall_s']:>10.1f}")
    print(f"guard: {guarded['guard_points']} evaluations, ≈ {guard_s:.2f} s each (guarded minus unguarded wall time)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
