"""The embedded default job: build a small real checkpoint family, merge it with every static method, report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.merge_job import run_merge_job
from service.spec import job_from_dict
from service.tiny_models import make_family
from workers.methods.registry import METHODS

log = logging.getLogger(__name__)


def _alignment(out: Path, base: dict, task_states: list[dict]) -> tuple[float, float]:
    """Mean cosine between the merged delta and each task vector, and the merged delta's norm over the mean τ norm."""
    merged = load_file(str(out / "model.safetensors"))
    keys = [k for k, v in base.items() if v.is_floating_point() and all(k in s for s in task_states)]
    delta = torch.cat([(merged[k].float() - base[k]).reshape(-1) for k in keys])
    taus = [torch.cat([(s[k] - base[k]).reshape(-1) for k in keys]) for s in task_states]
    cos = sum(float(torch.nn.functional.cosine_similarity(delta, t, dim=0)) for t in taus) / len(taus)
    return cos, float(delta.norm()) / (sum(float(t.norm()) for t in taus) / len(taus))


def run_demo(workdir: Path, num_tasks: int = 4) -> str:
    """Merge a tiny ViT family (base ViTModel + ViTForImageClassification task models) with every static method."""
    workdir = workdir.resolve()
    family = workdir / "vit-family"
    if not (family / "base" / "model.safetensors").exists():
        log.info("building a tiny ViT family in %s", family)
        make_family("vit", family, num_tasks=num_tasks)
    base_dir = family / "base"
    tasks = {f"task{t}": family / f"task{t}" for t in range(num_tasks)}
    base = load_file(str(base_dir / "model.safetensors"))
    prefix = "vit."
    task_states = [{k.removeprefix(prefix): v for k, v in load_file(str(p / "model.safetensors")).items()} for p in tasks.values()]
    lines = [
        f"rankmerge demo: {num_tasks} task models (ViTForImageClassification) of one base (ViTModel) in {family}",
        "(synthetic fine-tunes: the base plus seeded low-rank changes; real-data quality lives in the benchmarks)",
        "",
        f"{'method':<16} {'wall s':>7} {'cos(Δ, τ_t)':>12} {'|Δ|/|τ|':>8}  output",
    ]
    logging.getLogger("workers.plan").setLevel(logging.ERROR)  # the base-only pooler note is printed once below
    for method in METHODS:
        out = workdir / "merged" / method
        job = job_from_dict({"base": str(base_dir), "models": {k: str(v) for k, v in tasks.items()}, "method": method,
                             "output": str(out), "overwrite": True}, workdir)
        start = time.perf_counter()
        run_merge_job(job)
        cos, ratio = _alignment(out, base, task_states)
        lines.append(f"{method:<16} {time.perf_counter() - start:>7.2f} {cos:>12.3f} {ratio:>8.2f}  {out.relative_to(workdir)}")
    lines += ["", "pooler.dense.* exist only in the base (task models drop the pooler): they are copied from the base;",
              f"each output loads with transformers.AutoModel.from_pretrained; per-task heads are in <output>/heads/,",
              "and <output>/merge_report.json records roles, parameters, statistics, wall time and peak memory."]
    return "\n".join(lines)
