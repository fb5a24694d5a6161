"""One GPU against its host, in one table: the `gpu`-marked tests, static merges, adaptive steps, Ray, kill and resume.

    benchmarks/gpu_check.sh                       # on the GPU machine (≤ 8 minutes on one GPU, no download)
    GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh  # every row with cpu in place of cuda: checks the script anywhere

Rows (each measured run is a fresh subprocess, so its peak RSS and peak device memory are its own):
- `pytest -m gpu`: the CUDA tests (skipped, and counted as such, where torch sees no GPU).
- TSV-M and TA static merges of T ViT-B/32-shaped checkpoints (benchmarks/scale_models.py `vitb32`, fp32) on the
  CPU and on the device: wall, peak RSS, peak device memory, max |difference| of the outputs.
- One AdaRank-TA and one AdaMerging step over the same family, T tasks × B images, in-process executor on the device:
  s/step, split into merge (materialize + hand over), forward, backward, mask gradient (the closed-form backward
  into masks and λ, and Adam).
- The Ray executor, one shard and one worker sharing the GPU (half a GPU each), against the in-process executor on
  it (skipped with one line when ray is not installed).
- AdaRank run with `rankmerge run`, SIGKILLed after its first checkpoint and finished with `--resume`, against an
  uninterrupted run on the same device: max |difference| of the merged models.

Random weights and images: this measures device plumbing, speed and memory, not what a merge is worth.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
log = logging.getLogger("gpu_check")
GIB = 2**30
TESTS_TIMEOUT_S = 240


# ---- children: one measured piece of work each, result as one JSON line on stdout -------------------------------------
def _peaks(device: str) -> dict:
    import torch

    from rankmerge.workers.memory import peak_rss_bytes

    on_gpu = device.startswith("cuda")
    return {"rss": peak_rss_bytes(), "device_peak": torch.cuda.max_memory_allocated(torch.device(device)) if on_gpu else 0}


def _sync(device: str) -> float:
    """A clock reading after the device has finished what was queued (kernels run asynchronously)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
    return time.perf_counter()


def child_static(args: argparse.Namespace) -> dict:
    from rankmerge.service.merge_job import run_merge_job
    from rankmerge.service.spec import job_from_dict

    spec = {"base": str(args.models / "base"), "models": {t: str(args.models / t) for t in task_names(args.tasks)},
            "method": args.method, "output": str(args.out), "overwrite": True, "device": args.device}
    started = time.perf_counter()
    run_merge_job(job_from_dict(spec, args.out.parent))
    return {"wall": time.perf_counter() - started, **_peaks(args.device)}


class TimedLoss:
    """The worker's task models with `loss` (one task's forward to its scalar loss) timed: the rest of the worker's
    gradient call is the backward."""

    def __init__(self, models, device: str) -> None:
        self._models, self._device, self.seconds = models, device, 0.0

    def __getattr__(self, name: str):
        return getattr(self._models, name)

    def loss(self, *args, **kwargs):
        start = _sync(self._device)
        value = self._models.loss(*args, **kwargs)
        self.seconds += _sync(self._device) - start
        return value


def adaptive_spec(args: argparse.Namespace, method: str, out: Path) -> dict:
    params = {"factorization": "ta"} if method == "adarank" else {}
    tasks = task_names(args.tasks)
    return {"base": str(args.models / "base"), "models": {t: str(args.models / t) for t in tasks}, "method": method,
            "params": params, "output": str(out), "overwrite": True, "device": args.device,
            "tta": {"data": {t: str(args.models / "data" / f"{t}.safetensors") for t in tasks}, "steps": args.steps,
                    "batch_size": args.images, "checkpoint_every": 1, "evaluate": False, "holdout": 0,
                    "objective": "entropy"}}


def child_adaptive(args: argparse.Namespace) -> dict:
    """Steps of the in-process executor (one warm-up), split into their parts; medians over the timed steps."""
    import torch

    from rankmerge.service.merge_job import open_inputs
    from rankmerge.service.spec import job_from_dict
    from rankmerge.service.tta_job import start_executor

    job = job_from_dict(adaptive_spec(args, args.method, args.out), args.out.parent)
    with ExitStack() as stack:
        _, opened, plan = open_inputs(job, stack)
        runner = start_executor(job, plan, "local", None)
        stack.callback(runner.close)
        shard, worker = runner.shard, runner.worker
        worker.models = timed = TimedLoss(worker.models, args.device)
        batch = [torch.arange(args.images) for _ in opened]
        parts: dict[str, list[float]] = {"merge": [], "forward": [], "backward": [], "mask gradient": [], "step": []}
        for i in range(args.steps + 1):
            timed.seconds = 0.0
            t0 = _sync(args.device)
            worker.load_weights(shard.materialize(runner.work.dtype))
            t1 = _sync(args.device)
            (grads,), _ = worker.gradients(batch)
            t2 = _sync(args.device)
            shard.apply_gradients([grads])
            t3 = _sync(args.device)
            if i == 0:
                continue  # one-time kernel, allocator and autotuning set-up
            for name, value in (("merge", t1 - t0), ("forward", timed.seconds), ("backward", t2 - t1 - timed.seconds),
                                ("mask gradient", t3 - t2), ("step", t3 - t0)):
                parts[name].append(value)
        return {**{k: statistics.median(v) for k, v in parts.items()}, "build": runner.build_seconds, **_peaks(args.device)}


def child_ray(args: argparse.Namespace) -> dict:
    """Steps of the Ray executor: one shard and one worker, each given half of the one GPU (none in cpu mode)."""
    import torch

    from rankmerge.service.merge_job import open_inputs
    from rankmerge.service.spec import job_from_dict
    from rankmerge.service.tta_job import start_executor

    gpus = 0.5 if args.device.startswith("cuda") else 0.0
    spec = adaptive_spec(args, "adarank", args.out)
    spec.update(device="auto", resources={"shards": 1, "workers": 1, "gpus_per_shard": gpus, "gpus_per_worker": gpus})
    job = job_from_dict(spec, args.out.parent)
    with ExitStack() as stack:
        _, opened, plan = open_inputs(job, stack)
        started = time.perf_counter()
        runner = start_executor(job, plan, "ray", None)
        stack.callback(runner.close)
        ready = time.perf_counter() - started
        batch = [torch.arange(args.images) for _ in opened]
        times = []
        for i in range(args.steps + 1):
            start = time.perf_counter()
            runner.step(batch)
            if i:
                times.append(time.perf_counter() - start)
        return {"step": statistics.median(times), "startup": ready, "device": runner.device,
                "bytes_per_step": runner.bytes_last_step}


CHILDREN = {"static": child_static, "adaptive": child_adaptive, "ray": child_ray}


# ---- the parent: fixtures, subprocesses, the table ---------------------------------------------------------------------
def task_names(tasks: int) -> list[str]:
    return [f"t{i}" for i in range(tasks)]


def run_child(kind: str, args: argparse.Namespace, device: str, out: Path, method: str = "") -> dict:
    cmd = [sys.executable, str(HERE / "gpu_check.py"), "--child", kind, "--device", device, "--out", str(out),
           "--method", method, "--models", str(args.models), "--tasks", str(args.tasks), "--images", str(args.images),
           "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {method} on {device} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}


def gpu_tests() -> str:
    """`pytest -m gpu` over the test files that hold gpu-marked tests: its summary line."""
    files = sorted(p.name for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    # run from tests/: `-m` puts the working folder on sys.path, and the checkout's rankmerge/ is not the installed package
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files],
                              cwd=REPO / "tests", capture_output=True, text=True, env=child_env(), timeout=TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"stopped after {TESTS_TIMEOUT_S} s (the rest of the check goes on)"
    lines = [line.strip("= ") for line in done.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if done.returncode not in (0, 5):
        log.error("%s", done.stdout[-4000:] + done.stderr[-2000:])
    return (lines[-1] if lines else f"pytest exit {done.returncode}").split(" in ")[0]


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if x.keys() != y.keys():
        raise RuntimeError(f"{a} and {b} hold different tensors")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def measured(run: dict) -> str:
    text = f"{run['wall']:.1f} s, RSS {run['rss'] / GIB:.2f} GiB"
    return text + (f", device {run['device_peak'] / GIB:.2f} GiB" if run["device_peak"] else "")


def split(run: dict) -> str:
    return (f"{run['step']:.3f} s/step = merge {run['merge']:.3f} + forward {run['forward']:.3f} + backward "
            f"{run['backward']:.3f} + mask gradient {run['mask gradient']:.3f}"
            + (f"; device {run['device_peak'] / GIB:.2f} GiB" if run["device_peak"] else ""))


def static_rows(args: argparse.Namespace, device: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for method, label in (("tsv_m", "TSV-M"), ("task_arithmetic", "TA")):
        outs = {"host": args.work / f"{method}-host", "device": args.work / f"{method}-device"}  # apart also in cpu mode
        runs = {side: run_child("static", args, d, outs[side], method) for side, d in (("host", "cpu"), ("device", device))}
        diff = max_difference(outs["host"], outs["device"])
        rows.append((f"{label} static merge, {args.tasks} × ViT-B/32", measured(runs["host"]), measured(runs["device"]),
                     f"max |diff| {diff:.1e}"))
    return rows


def adaptive_rows(args: argparse.Namespace, device: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for method, label in (("adarank", "AdaRank-TA"), ("adamerging", "AdaMerging")):
        run = run_child("adaptive", args, device, args.work / f"{method}-local", method)
        rows.append((f"{label} step, {args.tasks} tasks × {args.images} images, local", "", split(run),
                     f"factorization {run['build']:.1f} s"))
    return rows


def ray_rows(args: argparse.Namespace, device: str, local_step: float) -> list[tuple[str, str, str, str]]:
    if importlib.util.find_spec("ray") is None:
        return [("Ray executor, 1 shard + 1 worker", "", "skipped: ray is not installed", "")]
    run = run_child("ray", args, device, args.work / "adarank-ray", "adarank")
    return [("AdaRank-TA step, Ray: 1 shard + 1 worker", "", f"{run['step']:.3f} s/step ({run['device']})",
             f"local {local_step:.3f} s/step; {run['bytes_per_step'] / 2**20:.0f} MiB through the store per step")]


def rankmerge_run(spec: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rankmerge", "run", str(spec), *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=spec.parent)


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{err[-3000:]}")


def resume_rows(args: argparse.Namespace, device: str) -> list[tuple[str, str, str, str]]:
    """An uninterrupted run, and one SIGKILLed once checkpoint 1 is on disk and then resumed: the same model?"""
    import yaml

    paths = {}
    for name in ("uninterrupted", "killed"):
        spec = adaptive_spec(args, "adarank", args.work / f"resume-{name}")
        shutil.rmtree(args.work / f"resume-{name}.job", ignore_errors=True)
        paths[name] = args.work / f"resume-{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**spec, "tta": {**spec["tta"], "steps": args.steps + 2}}))
    started = time.perf_counter()
    finish(rankmerge_run(paths["uninterrupted"]), "the uninterrupted run")
    whole = time.perf_counter() - started
    victim = rankmerge_run(paths["killed"])
    checkpoint = args.work / "resume-killed.job" / "checkpoints" / "step_00000001"
    while not checkpoint.exists() and victim.poll() is None:
        time.sleep(0.02)
    if victim.poll() is not None:
        raise RuntimeError("the run ended before it could be killed")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    finish(rankmerge_run(paths["killed"], "--resume"), "the resumed run")
    report = json.loads((args.work / "resume-killed" / "merge_report.json").read_text())
    diff = max_difference(args.work / "resume-killed", args.work / "resume-uninterrupted")
    return [(f"AdaRank-TA, SIGKILL after step {report['resumed_from_step']} + --resume", "",
             f"max |diff| {diff:.1e} against the uninterrupted run", f"uninterrupted {whole:.1f} s, {report['device']}")]


def table(rows: list[tuple[str, str, str, str]], device: str) -> str:
    header = ("check", "cpu", device, "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def device_label(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return f"{device} (GPU_CHECK_DEVICE)"
    return f"{device} ({torch.cuda.get_device_name(torch.device(device).index or 0)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=os.environ.get("GPU_CHECK_DEVICE", "cuda"), help="cuda (default) or cpu")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--images", type=int, default=16, help="images per task and step")
    ap.add_argument("--layers", type=int, default=12, help="ViT-B/32 has 12; fewer for a quick run")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per adaptive row (after one warm-up)")
    ap.add_argument("--workdir", type=Path, default=REPO / ".bench" / "gpu_check")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch
    from transformers.utils import logging as hf_logging

    from scale_models import generate

    hf_logging.disable_progress_bar()  # save_pretrained's bars would break up the log above the table

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("torch %s sees no CUDA GPU (set GPU_CHECK_DEVICE=cpu to check the script without one)", torch.__version__)
        return 1
    started = time.perf_counter()
    args.models = args.workdir / f"vitb32-{args.tasks}x{args.layers}"
    args.work = args.workdir / "runs"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rows = [("pytest -m gpu", "", gpu_tests(), "")]
    log.info("%s; writing the checkpoints", rows[0][2])
    generate("vitb32", args.tasks, args.models, args.layers)
    rows += static_rows(args, args.device)
    log.info("static merges done")
    rows += adaptive_rows(args, args.device)
    local_step = float(rows[-2][2].split(" s/step")[0])
    rows += ray_rows(args, args.device, local_step)
    log.info("adaptive steps done")
    rows += resume_rows(args, args.device)
    print(f"\nrankmerge GPU check: torch {torch.__version__}, {args.tasks} × ViT-B/32-shaped "
          f"({args.layers} layers, fp32), {time.perf_counter() - started:.0f} s in all\n")
    print(table(rows, device_label(args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
