"""AdaRank on 8 checkpoints of a ~1.1B Llama: the distributed job (2 SpectralShard actors, a 2-rank DeepSpeed ZeRO-3
group of CPU workers, embedded local Ray), measured as one process tree.

    .venv/bin/python benchmarks/scale_models.py llama1b --tasks 8 --out .bench/scale/llama1b    # the checkpoints
    .venv/bin/python benchmarks/llm_adarank.py --factorization ta                               # this benchmark

It writes a job spec under --out, runs `rankmerge run SPEC --executor ray` as a subprocess, samples the peak memory
of that whole tree (driver + Ray's processes + actors, plasma counted once: see benchmarks/process_tree.py) and
prints, from the job's merge_report.json: shard build time (read + task vectors + factorization, slowest shard),
seconds per step, bytes through the object store per step, and per-task entropy at step 1 (the initial merge)
against the last step (the weights after steps − 1 updates). It refuses to start when less than
--min-available-gb of memory is available (other jobs share the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from process_tree import TreeSampler, available_bytes, kill_tree

GB = 1024**3
REPO = Path(__file__).resolve().parent.parent


def find_tasks(models: Path) -> dict[str, Path]:
    """Task name -> model dir: every finished model folder beside base/ (a `.complete` marker where one is written)."""
    tasks = {d.name: d for d in sorted(models.iterdir()) if (d / "config.json").exists() and d.name != "base"}
    unfinished = [d.name for d in [models / "base", *tasks.values()] if (models / "base" / ".complete").exists()
                  and not (d / ".complete").exists()]
    if not tasks or unfinished:
        sys.exit(f"{models}: checkpoints missing or unfinished ({', '.join(unfinished) or 'no task models'}); "
                 f"generate them with: .venv/bin/python benchmarks/scale_models.py llama1b --tasks 8 --out {models}")
    return tasks


def data_file(models: Path, task: str) -> Path:
    found = sorted((models / "data").glob(f"{task}.*"))
    if not found:
        sys.exit(f"{models}/data has no prompts for task {task!r}; regenerate the checkpoints")
    return found[0]


def job_spec(args: argparse.Namespace, tasks: dict[str, Path]) -> dict:
    params = {"factorization": args.factorization, "max_rank": args.max_rank, "factor_dtype": "bfloat16", "svd": args.svd}
    return {
        "base": str(args.models / "base"),
        "models": {name: str(path) for name, path in tasks.items()},
        "method": "adarank",
        "params": params,
        "output": str(args.out / "merged"),
        "overwrite": True,
        "tta": {"data": {name: str(data_file(args.models, name)) for name in tasks}, "steps": args.steps,
                "batch_size": args.batch, "max_length": args.max_length, "checkpoint_every": args.steps, "lr": args.lr},
        "resources": {"shards": args.shards, "workers": args.workers, "partition": "zero3"},
    }


def run(args: argparse.Namespace, spec_path: Path) -> tuple[float, TreeSampler, int]:
    cmd = [str(REPO / ".venv" / "bin" / "rankmerge"), "-v", "run", str(spec_path), "--executor", "ray"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    log = args.out / "run.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with TreeSampler(proc.pid, args.interval) as sampler:
            while proc.poll() is None:
                if available_bytes() < args.abort_below_gb * GB:  # the machine is shared: never push others into OOM
                    kill_tree(proc.pid)
                    by_role = ", ".join(f"{r} {b / GB:.2f}" for r, b in sampler.peak.by_role.items())
                    sys.exit(f"aborted: available memory fell below {args.abort_below_gb} GiB with this job's tree at "
                             f"{sampler.peak.pss / GB:.1f} GiB PSS (peak so far: {by_role}); see {log}")
                time.sleep(1.0)
            code = proc.returncode
    if code != 0:
        by_role = ", ".join(f"{r} {b / GB:.2f}" for r, b in sampler.peak.by_role.items())
        sys.exit(f"the job failed (exit {code}) with its tree at {sampler.peak.pss / GB:.1f} GiB PSS at the peak ({by_role}); "
                 f"last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    return time.perf_counter() - start, sampler, code


def table(report: dict, wall: float, sampler: TreeSampler, args: argparse.Namespace, spec_path: Path) -> str:
    timing, history = report["timing"], report["history"]
    steps = timing["step_seconds"]
    first, last = history[0]["task_loss"], history[-1]["task_loss"]
    peak = sampler.peak
    lines = [
        f"AdaRank-{args.factorization.upper()} | {len(first)} tasks | {args.shards} shards x {args.workers} ZeRO-3 workers | "
        f"max_rank {args.max_rank}, bf16 factors, svd {args.svd} | batch {args.batch} x {args.max_length} tokens",
        f"  shard build (read + task vectors + factorization), slowest shard: {timing['shard_build_seconds']:.1f} s",
        f"  s/step: median {statistics.median(steps):.1f} (all: {', '.join(f'{s:.1f}' for s in steps)})",
        f"  bytes through the object store per step: {timing['bytes_per_step'] / GB:.2f} GiB",
        f"  peak tree PSS: {peak.pss / GB:.2f} GiB (sum of RSS at its peak {peak.rss / GB:.2f} GiB, plasma counted per mapper); "
        f"{peak.samples} samples every {args.interval} s",
        "    at the PSS peak: " + ", ".join(f"{role} {b / GB:.2f}" for role, b in sorted(peak.by_role.items(), key=lambda kv: -kv[1])),
        f"  whole run (start-up, build, {len(steps)} steps, export): {wall:.0f} s",
        f"  entropy, step 1 (initial merge) -> step {len(history)} (after {len(history) - 1} updates):",
    ]
    names = list(report["tta"]["data"])
    for name, a, b in zip(names, first, last):
        lines.append(f"    {name:>10}: {a:.4f} -> {b:.4f} ({b - a:+.4f})")
    lines.append(f"    {'sum':>10}: {sum(first):.4f} -> {sum(last):.4f}")
    lines.append(f"  command: .venv/bin/rankmerge run {spec_path.relative_to(REPO) if spec_path.is_relative_to(REPO) else spec_path} --executor ray")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=REPO / ".bench" / "scale" / "llama1b", help="base/, task dirs, data/")
    ap.add_argument("--out", type=Path, default=None, help="default: .bench/llm-adarank/<factorization>")
    ap.add_argument("--factorization", choices=["ta", "tsv_m"], default="ta")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--svd", choices=["exact", "randomized"], default="randomized")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between memory samples (each reads every process's smaps)")
    ap.add_argument("--min-available-gb", type=float, default=18.0)
    ap.add_argument("--abort-below-gb", type=float, default=1.0, help="kill the job if available memory falls below this")
    args = ap.parse_args()
    args.models = args.models.resolve()
    args.out = (args.out or REPO / ".bench" / "llm-adarank" / args.factorization).resolve()
    tasks = find_tasks(args.models)
    free = available_bytes() / GB
    if free < args.min_available_gb:
        sys.exit(f"only {free:.1f} GiB of memory available, the run needs about {args.min_available_gb:.0f}: "
                 "wait for other jobs to finish or lower --min-available-gb")
    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = args.out / "job.yaml"
    spec_path.write_text(yaml.safe_dump(job_spec(args, tasks), sort_keys=False))
    for stale in (args.out / "merged.job",):  # a fresh run, never a resume of an earlier one
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    wall, sampler, _ = run(args, spec_path)
    report = json.loads((args.out / "merged" / "merge_report.json").read_text())
    result = table(report, wall, sampler, args, spec_path)
    (args.out / "result.txt").write_text(result + "\n")
    print(result)


if __name__ == "__main__":
    main()
