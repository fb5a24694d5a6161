"""Distributed AdaRank benchmark: the Ray executor against the local executor on the same job and machine.

Prints, side by side:
- seconds per adaptation step: local (one process) vs Ray (1 shard x 1 worker, 2 x 2 replicated, 2 x 2 ZeRO-3), ratio;
- the SVD phase (read + task vectors + factorization) with 1 vs 2 shard actors, one thread each: scaling efficiency;
- bytes crossing the object store per step (every rank pulls every shard's weights, shards pull rank 0's gradients);
- zero-copy check: fetching a 256 MB numpy array vs a torch tensor of the same size from the object store.

    .venv/bin/python benchmarks/distributed.py [--hidden 384] [--layers 6] [--tasks 4] [--batch 16] [--steps 5]

The family is random-init ViT (timing does not depend on what the weights know), cached under --workdir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


from rankmerge.cluster.executor import LocalExecutor
from rankmerge.cluster.ray_executor import RayExecutor
from rankmerge.cluster.ray_runtime import ensure_ray
from rankmerge.service.spec import job_from_dict
from rankmerge.service.tiny_models import make_family
from rankmerge.service.tta_job import adaptive_work
from rankmerge.workers.tta.data import IndexStream
from rankmerge.workers.tta.sources import open_sources


def existing_fixture(args: argparse.Namespace) -> dict:
    """The first --tasks models of a checkpoint set (benchmarks/scale_models.py), for the SVD phase only."""
    models = Path(args.models).resolve()
    tasks = sorted((d for d in models.iterdir() if (d / "config.json").exists() and d.name != "base"),
                   key=lambda d: int("".join(filter(str.isdigit, d.name)) or 0))[: args.tasks]
    data = {d.name: str(models / "data" / f"{d.name}.safetensors") for d in tasks}
    return {"base": str(models / "base"), "models": {d.name: str(d) for d in tasks}, "method": "adarank",
            "params": {"factorization": "ta", **json.loads(args.params)}, "output": str(Path(args.workdir).resolve() / "out"),
            "tta": {"data": data, "steps": 1, "batch_size": args.batch}}


def fixture(args: argparse.Namespace) -> dict:
    if args.models:
        return existing_fixture(args)
    root = (Path(args.workdir) / f"vit-h{args.hidden}-l{args.layers}-t{args.tasks}").resolve()
    sizes = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
             "intermediate_size": 4 * args.hidden, "image_size": args.image, "patch_size": 4}
    if not (root / "done").exists():
        make_family("vit", root, num_tasks=args.tasks, sizes=sizes)
        for t in range(args.tasks):
            gen = torch.Generator().manual_seed(t)
            save_file({"pixel_values": torch.randn(256, 1, args.image, args.image, generator=gen)}, root / f"data{t}.safetensors")
        (root / "done").write_text("1")
    return {"base": str(root / "base"), "models": {f"task{t}": str(root / f"task{t}") for t in range(args.tasks)},
            "method": "adarank", "params": {"factorization": "ta", **json.loads(args.params)}, "output": str(root / "out"),
            "tta": {"data": {f"task{t}": str(root / f"data{t}.safetensors") for t in range(args.tasks)},
                    "steps": 100, "batch_size": args.batch, "lr": 0.01}}


def time_steps(executor, job, args: argparse.Namespace) -> tuple[list[float], int]:
    streams = [IndexStream(name, 256, 0) for name in job.models]
    times, moved = [], 0
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        executor.step([s.next_indices(args.batch) for s in streams])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            moved = getattr(executor, "bytes_last_step", 0)
    return times, moved


def ray_run(work, job_dir: Path, job, args, shards_cpus: float, workers: int, steps: bool = True) -> dict:
    start = time.perf_counter()
    executor = RayExecutor(work, job_dir, workers, shards_cpus, 1.0, 0.0, 0.0)
    ready = time.perf_counter() - start
    build = max(__import__("ray").get([s.build_seconds.remote() for s in executor.shards]))
    out = {"startup_s": ready, "factorize_s": build}
    if steps:
        times, moved = time_steps(executor, job, args)
        out.update(step_s=statistics.median(times), bytes_per_step=moved)
    executor.close()
    return out


def zero_copy_check() -> dict:
    import ray

    array = np.ones(256 * 1024**2 // 4, dtype=np.float32)
    out = {}
    for name, value in {"numpy": array, "torch": torch.from_numpy(array)}.items():
        ref = ray.put(value)
        start = time.perf_counter()
        ray.get(ref)
        out[f"get_{name}_ms"] = 1000 * (time.perf_counter() - start)
        del ref
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".bench/distributed")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local executor (each actor has 1)")
    parser.add_argument("--params", default="{}", help='AdaRank parameters as JSON, e.g. \'{"max_rank": 64, "svd": "randomized"}\'')
    parser.add_argument("--models", help="an existing checkpoint set (base/, task dirs, data/) instead of the random ViT")
    parser.add_argument("--svd-only", action="store_true", help="measure only the SVD phase with 1 and 2 shard actors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spec = fixture(args)
    root = Path(spec["output"]).parent
    results: dict[str, dict] = {}
    if args.svd_only:
        ensure_ray(None, 4)
    for shards, workers, partition in [] if args.svd_only else [(1, 1, "replicated"), (2, 2, "replicated"), (2, 2, "zero3")]:
        job = job_from_dict(dict(spec, resources={"shards": shards, "workers": workers, "partition": partition}), root)
        with ExitStack() as stack:
            plan = open_sources(job.sources, stack)[2]
        if "local" not in results:
            start = time.perf_counter()
            local = LocalExecutor(adaptive_work(job, plan, 1), threads=args.threads)
            build = time.perf_counter() - start
            times, _ = time_steps(local, job, args)
            results["local"] = {"startup_s": build, "factorize_s": local.shard.build_seconds, "step_s": statistics.median(times)}
            local.close()
            ensure_ray(None, 4)
            results["weights_mb"] = {"value": plan.merged_numel * 4 / 1e6}
        results[f"ray {shards}x{workers} {partition}"] = ray_run(adaptive_work(job, plan, shards), root / "job", job, args, 1.0, workers)
    svd = {}
    for shards in (1, 2):
        job = job_from_dict(dict(spec, resources={"shards": shards}), root)
        with ExitStack() as stack:
            plan = open_sources(job.sources, stack)[2]
        start = time.perf_counter()
        svd[shards] = ray_run(adaptive_work(job, plan, shards), root / "job", job, args, 1.0, 1, steps=False)
        svd[shards]["phase_s"] = time.perf_counter() - start
    results["svd"] = {"1 shard factorize_s": svd[1]["factorize_s"], "2 shards factorize_s": svd[2]["factorize_s"],
                      "efficiency": svd[1]["factorize_s"] / (2 * svd[2]["factorize_s"])}
    s = results["svd"]
    svd_line = (f"SVD phase, 1 thread per shard: 1 shard {s['1 shard factorize_s']:.2f} s, 2 shards {s['2 shards factorize_s']:.2f} s "
                f"(slowest shard) -> scaling efficiency {s['efficiency']:.0%}")
    if args.svd_only:
        print(f"{len(spec['models'])} tasks of {spec['base']}, params {spec['params']}")
        print(svd_line)
        return
    results["zero_copy"] = zero_copy_check()
    local_step = results["local"]["step_s"]
    print(f"ViT h{args.hidden} x {args.layers} layers, {args.tasks} tasks, batch {args.batch}, "
          f"{results['weights_mb']['value']:.1f} MB merged weights; median of {args.steps} steps after {args.warmup} warmup")
    print(f"{'executor':<26}{'startup s':>11}{'factorize s':>13}{'step s':>9}{'vs local':>10}{'MB/step':>9}")
    for name, row in results.items():
        if "step_s" in row:
            moved = row.get("bytes_per_step", 0) / 1e6
            print(f"{name:<26}{row['startup_s']:>11.2f}{row['factorize_s']:>13.2f}{row['step_s']:>9.3f}"
                  f"{row['step_s'] / local_step:>9.2f}x{moved:>9.1f}")
    print(svd_line)
    z = results["zero_copy"]
    print(f"object store get of 256 MB: numpy {z['get_numpy_ms']:.1f} ms, torch {z['get_torch_ms']:.1f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
