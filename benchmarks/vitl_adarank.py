"""AdaRank on 20 ViT-L/14 checkpoints on one machine: peak memory, time, and the --dry-run forecast of both.

The job: AdaRank over TA's per-task SVD factors, at most --max-rank components per task vector, bf16 factors,
randomized SVD, a few adaptation steps on small synthetic unlabeled images (--image px: the position embeddings are
interpolated, as a user adapting on small crops would), in-process executor. It runs `rankmerge run SPEC --dry-run`,
then `rankmerge run SPEC` in a fresh subprocess (wall time, ru_maxrss, sampled tree RSS) and prints both side by
side with the job's own timing (factorization, each step).

    .venv/bin/python benchmarks/scale_models.py vitl --tasks 20 --out .bench/scale/vitl     # the checkpoints
    .venv/bin/python benchmarks/vitl_adarank.py --tasks 20 --steps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from measure import REPO, flush, measure, wait_quiet

LOG = logging.getLogger("vitl_adarank")
GIB = 2**30


def write_data(out: Path, tasks: list[str], image: int, rows: int) -> dict[str, str]:
    """Seeded noise images per task (unlabeled): adaptation cost, not quality, is measured here."""
    data = {}
    for i, task in enumerate(tasks):
        path = out / "data" / f"{task}-{image}px.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            gen = torch.Generator().manual_seed(1000 + i)
            save_file({"pixel_values": torch.randn(rows, 3, image, image, generator=gen)}, str(path))
        data[task] = str(path)
    return data


def job_spec(args: argparse.Namespace) -> dict:
    tasks = [f"t{i}" for i in range(args.tasks)]
    return {
        "base": str(args.models / "base"), "models": {t: str(args.models / t) for t in tasks}, "method": "adarank",
        "params": {"factorization": args.factorization, "max_rank": args.max_rank, "factor_dtype": "bfloat16",
                   "svd": "randomized"},
        "output": str(args.out / "merged"), "overwrite": True,
        "tta": {"data": write_data(args.out, tasks, args.image, 4 * args.batch), "steps": args.steps,
                "batch_size": args.batch, "checkpoint_every": args.steps, "evaluate": False},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=REPO / ".bench" / "scale" / "vitl")
    ap.add_argument("--out", type=Path, default=REPO / ".bench" / "scale" / "vitl-adarank")
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--factorization", choices=["ta", "cart", "tsv_m", "iso_cts"], default="ta")
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image", type=int, default=56)
    ap.add_argument("--quiet-wait", type=float, default=180.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.models, args.out = args.models.resolve(), args.out.resolve()
    shutil.rmtree(args.out / "merged.job", ignore_errors=True)  # a fresh run, never a resume
    args.out.mkdir(parents=True, exist_ok=True)
    spec = args.out / "job.yaml"
    spec.write_text(yaml.safe_dump(job_spec(args), sort_keys=False))
    cmd = [str(REPO / ".venv" / "bin" / "rankmerge"), "-v", "run", str(spec)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    flush()
    wait_quiet(args.quiet_wait)
    dry = measure(cmd + ["--dry-run"], args.out / "dry-run.log", env)
    dry.exit_unless_ok(cmd, args.out / "dry-run.log")
    text = (args.out / "dry-run.log").read_text()
    predicted_s = float(re.search(r"predicted wall time: ([\d.]+) s", text).group(1))
    predicted_gib = float(re.search(r"predicted peak memory: ([\d.]+) GiB", text).group(1))
    flush()
    wait_quiet(args.quiet_wait)
    run = measure(cmd, args.out / "run.log", env)
    run.exit_unless_ok(cmd, args.out / "run.log")
    report = json.loads((args.out / "merged" / "merge_report.json").read_text())
    timing = report["timing"]
    print(f"AdaRank-{args.factorization.upper()}, {args.tasks} x ViT-L/14 (fp16), max_rank {args.max_rank}, bf16 factors, "
          f"randomized SVD, {args.steps} steps, batch {args.batch} x {args.image}px per task, in-process executor")
    print(f"  forecast ({dry.wall:.0f} s dry run): {re.search(r'predicted wall time: .*', text).group(0)}")
    print(f"  measured: wall {run.wall:.1f} s ({(predicted_s - run.wall) / run.wall:+.0%} forecast error), "
          f"peak RSS {run.rss / GIB:.2f} GiB ({(predicted_gib * GIB - run.rss) / run.rss:+.0%}), tree {run.tree / GIB:.2f} GiB, "
          f"other load {run.background:.2f} cores")
    print(f"  factorization {timing['shard_build_seconds']:.1f} s; steps {', '.join(f'{s:.1f}' for s in timing['step_seconds'])} s")


if __name__ == "__main__":
    main()
