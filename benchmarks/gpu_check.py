"""GPU against CPU on the tiny models: a static TSV-M merge (wall, max |difference|) and 20 AdaRank steps of the
in-process executor (s/step). Run by benchmarks/gpu_check.sh after the `gpu`-marked tests; needs no download."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rankmerge.service.merge_job import open_inputs, run_merge_job
from rankmerge.service.spec import job_from_dict
from rankmerge.service.tiny_models import make_family
from rankmerge.service.tta_job import start_executor

log = logging.getLogger("gpu_check")
STEPS = 20


def static_merge(root: Path, base: Path, tasks: dict[str, Path], device: str) -> tuple[float, dict[str, torch.Tensor]]:
    out = root / f"tsv_m-{device}"
    job = job_from_dict({"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "tsv_m",
                         "output": str(out), "overwrite": True, "device": device}, root)
    started = time.perf_counter()
    run_merge_job(job)
    return time.perf_counter() - started, load_file(str(out / "model.safetensors"))


def adarank_steps(root: Path, base: Path, tasks: dict[str, Path], device: str) -> float:
    """Seconds per step over STEPS steps (after one warm-up step) of AdaRank (entropy) on `device`."""
    data = {}
    for i, name in enumerate(tasks):
        data[name] = str(root / f"{name}.safetensors")
        save_file({"pixel_values": torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(i))}, data[name])
    spec = {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "adarank",
            "output": str(root / f"adarank-{device}"), "device": device,
            "tta": {"data": data, "steps": STEPS, "batch_size": 16, "objective": "entropy"}}
    job = job_from_dict(spec, root)
    with ExitStack() as stack:
        _, opened, plan = open_inputs(job, stack)
        runner = start_executor(job, plan, "local", None)
        stack.callback(runner.close)
        batch = [torch.arange(16) for _ in opened]
        runner.step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(STEPS):
            runner.step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / STEPS


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("torch %s sees no CUDA GPU: nothing to compare", torch.__version__)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, tasks = make_family("vit", root / "vit")
        (cpu_s, cpu_w), (gpu_s, gpu_w) = (static_merge(root, base, tasks, d) for d in ("cpu", "cuda"))
        diff = max(float((cpu_w[k] - gpu_w[k]).abs().max()) for k in cpu_w)
        rows.append(("static TSV-M merge (s)", cpu_s, gpu_s, f"max |diff| {diff:.2e}"))
        cpu_step, gpu_step = (adarank_steps(root, base, tasks, d) for d in ("cpu", "cuda"))
        rows.append((f"AdaRank s/step ({STEPS} steps)", cpu_step, gpu_step, ""))
    log.info("%-32s %10s %10s  %s", "", "cpu", torch.cuda.get_device_name(0)[:10], "")
    for name, cpu, gpu, note in rows:
        log.info("%-32s %10.4f %10.4f  %s", name, cpu, gpu, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
