"""Test-time-adaptation step benchmark: seconds per AdaMerging step, rankmerge vs FusionBench.

One step = merge the weights from the current coefficients, forward T tasks x B images
through the merged CLIP ViT-B/32-shaped vision encoder and each task's head, entropy
loss, backward, optimizer step. Random weights and images (timing does not depend on
what the model knows); every runner reads the same fixture, so the per-step losses can
be compared as well.

    .venv/bin/python benchmarks/tta_step.py [--steps 3] [--warmup 1] [--tasks 8] [--batch 16]

Each runner is one measured subprocess (its own venv, its own peak RSS), started only
once the machine is quiet; the FusionBench runner also waits for quiet before every step
and redoes a step that still shared the 2 cores with other work (such a step runs several
times slower), so the medians come from clean steps. Everything generated (FusionBench's
venv, the fixture, logs) lives under --workdir (default .bench, git-ignored) and is
reused on the next run.

Adding a runner (the rankmerge side): put a function in RUNNERS,

    def my_runner(args: argparse.Namespace, fixture: Path, logs: Path) -> dict

that returns the JSON object below; most simply it calls run_command() on a script that
accepts --models FIXTURE --tasks --batch --steps --warmup --threads --json-out PATH and
writes that object to PATH:

    {"runner": str,
     "steps": [            # the timed steps only, each a dict; every key but "total" optional
        {"total": s, "merge": s, "forward": s, "backward": s, "optimizer": s,
         "loss": float,                 # summed task entropies of that step
         "background_cores": float,     # other work's CPU during the step (trust <= 0.15)
         "rss_bytes": int}, ...],       # RSS right after the step
     "warmup": [{...}],    # optional, same keys: warmup[0]["loss"] is the loss at the
                           # initial coefficients (0.3): equal, to rounding, for all
     "peak_rss_bytes": int,             # optional: run_command() measures ru_maxrss anyway
     "setup_s": float, "meta": {...}}   # optional

Fixture (--workdir/tta/clip-vit-b32-<T>x<B>/): base/ and task_0..task_{T-1}/ are
transformers CLIPVisionModel checkpoints (config.json + model.safetensors);
heads.safetensors holds "visual_projection.weight" [512, 768], "logit_scale" [] and
"heads.task_i" [classes, 512]; inputs.safetensors holds "images.task_i" [B, 3, 224, 224].
The files' keys start with "vision_model." (transformers 4 layout); transformers 5 loads
them into its CLIPVisionModel, whose own keys drop that prefix.
Logits as FusionBench computes them: p = pooler_output @ visual_projection.weight.T;
logits = exp(logit_scale) * normalize(p) @ heads.task_i.T; loss = mean entropy per task.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from static_merge import BUSY_LIMIT, measure, rel, wait_quiet  # same measuring as static merge
from venvs import ensure_venv

LOG = logging.getLogger("tta_step")
REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
FB_REQS = BENCH / "fusionbench-requirements.txt"
FB_SCRIPT = BENCH / "fusionbench_adamerging_step.py"
REFERENCE = "rankmerge adamerging"  # the ratio column divides by this runner's s/step when it ran
COMPONENTS = ("merge", "forward", "backward", "optimizer")
GB = 1e9
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")


# --------------------------------------------------------------------------- running
def runner_args(args: argparse.Namespace, fixture: Path) -> list[str]:
    """The flags every command runner accepts, so all of them time the same work."""
    return ["--models", str(fixture), "--tasks", str(args.tasks), "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads)]


def run_command(name: str, cmd: list[str], logs: Path) -> dict:
    """Run one runner as a measured subprocess once the machine is quiet; return its JSON.

    The command gets --json-out PATH appended and must write its result object there.
    Adds "process": wall time of the whole subprocess (setup included), its ru_maxrss,
    the sampled RSS of its process tree and the CPU other work used meanwhile.
    """
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    out, log = logs / f"tta-{slug}.json", logs / f"tta-{slug}.log"
    out.unlink(missing_ok=True)
    wait_quiet()
    LOG.info("running %s (log: %s)", name, rel(str(log)))
    wall, rss, tree, background = measure([*cmd, "--json-out", str(out)], log, ENV)
    result = json.loads(out.read_text())
    result["process"] = {"wall_s": wall, "ru_maxrss_bytes": rss, "tree_rss_bytes": tree,
                         "background_cores": background, "log": rel(str(log))}
    result.setdefault("peak_rss_bytes", rss)
    result["cmd"] = rel(" ".join(cmd))
    return result


def fusionbench(args: argparse.Namespace, fixture: Path, logs: Path, backward: str) -> dict:
    """FusionBench 0.2.33's layer-wise AdaMerging in its own venv (see its script)."""
    py = ensure_venv("fusionbench", FB_REQS, args.workdir)
    return run_command(f"fusionbench-{backward}",
                       [str(py), str(FB_SCRIPT), *runner_args(args, fixture),
                        "--backward", backward], logs)


RM_SCRIPT = BENCH / "rankmerge_tta_step.py"


def rankmerge(args: argparse.Namespace, fixture: Path, logs: Path, method: str) -> dict:
    """rankmerge's engine in the project's own venv (see benchmarks/rankmerge_tta_step.py)."""
    return run_command(f"rankmerge-{method}", [sys.executable, str(RM_SCRIPT), *runner_args(args, fixture), "--method", method], logs)


Runner = Callable[[argparse.Namespace, Path, Path], dict]
RUNNERS: dict[str, Runner] = {
    # rankmerge: one backward of the summed task entropies per step, λ per task × tensor (and masks for AdaRank).
    "rankmerge adarank (ta)": functools.partial(rankmerge, method="adarank"),
    "rankmerge adamerging": functools.partial(rankmerge, method="adamerging"),
    # FusionBench's own loop: per task forward + backward(retain_graph=True), T backwards/step.
    "fusionbench": functools.partial(fusionbench, backward="per-task"),
    # FusionBench's classes, but one backward of the summed task entropies per step.
    "fusionbench (summed loss)": functools.partial(fusionbench, backward="summed"),
}


def ensure_fixture(args: argparse.Namespace, logs: Path) -> Path:
    """Write (or reuse) the shared models and images, with FusionBench's transformers<5, whose
    checkpoints transformers 5 also reads. Not timed."""
    fixture = args.workdir / "tta" / f"clip-vit-b32-{args.tasks}x{args.batch}"
    py = ensure_venv("fusionbench", FB_REQS, args.workdir)
    log = logs / "tta-fixture.log"
    with open(log, "w") as fh:
        proc = subprocess.run([str(py), str(FB_SCRIPT), "--prepare", "--models", str(fixture),
                               "--tasks", str(args.tasks), "--batch", str(args.batch)],
                              stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    if proc.returncode != 0:
        sys.exit(f"fixture preparation failed; see {log}:\n{log.read_text()[-3000:]}")
    return fixture


# --------------------------------------------------------------------------- reporting
def summarize(result: dict) -> dict:
    """Median over the timed steps of the total and of each component every step reports."""
    steps = result["steps"]
    row = {"s/step": statistics.median(s["total"] for s in steps)}
    for c in COMPONENTS:
        row[c] = statistics.median(s[c] for s in steps) if all(c in s for s in steps) else None
    row["rss"] = result.get("peak_rss_bytes")
    # other work on the machine: per step where the runner measures it, else whole process
    per_step = [s["background_cores"] for s in steps if "background_cores" in s]
    row["background"] = max(per_step) if per_step else \
        result.get("process", {}).get("background_cores", 0.0)
    return row


def table(results: dict[str, dict]) -> str:
    """Markdown table for any number of runners; ratio = s/step over the reference's."""
    rows = {name: summarize(r) for name, r in results.items()}
    ref = REFERENCE if REFERENCE in rows else next(iter(rows))

    def cell(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"| runner | s/step | merge | forward | backward | optimizer | peak RSS GB "
             f"| s/step ÷ {ref} | all steps, s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        walls = ", ".join(f"{s['total']:.1f}" for s in results[name]["steps"])
        lines.append(
            f"| {name} | {row['s/step']:.2f} | "
            + " | ".join(cell(row[c], ".2f" if c != "optimizer" else ".3f") for c in COMPONENTS)
            + f" | {cell(row['rss'] and row['rss'] / GB, '.2f')} "
            f"| {row['s/step'] / rows[ref]['s/step']:.2f} "
            f"| {walls} |")
    return "\n".join(lines)


def report(args: argparse.Namespace, fixture: Path, results: dict[str, dict], wall: float) -> None:
    spec = json.loads((fixture / "spec.json").read_text())
    print(f"\n### Test-time adaptation: one AdaMerging step, CLIP ViT-B/32-shaped vision encoder, "
          f"{args.tasks} tasks x {args.batch} images\n")
    print(f"Random init (hidden {spec['hidden_size']}, {spec['num_hidden_layers']} layers, "
          f"{spec['num_attention_heads']} heads, intermediate {spec['intermediate_size']}, "
          f"{spec['image_size']}px, patch {spec['patch_size']}), {args.tasks} fine-tunes = base + "
          f"N(0, {spec['noise']}²), {spec['classes']}-class heads; fp32, CPU, "
          f"{args.threads} threads. Median of each runner's clean timed steps ({args.steps} asked, "
          f"after {args.warmup} warm-up; all listed in the last column); components are timers "
          "around each call inside the step.\n")
    print(table(results))
    print("\npeak RSS = the runner's own ru_maxrss (whole process, models and setup included).")
    for name, r in results.items():
        row, meta = summarize(r), r.get("meta", {})
        proc = r.get("process", {})
        first = (r.get("warmup") or r["steps"])[0]  # the step at the initial coefficients
        print(f"\n{name}: loss at the initial coefficients {first.get('loss', float('nan')):.6f}"
              + (f"; RSS after a step {r['steps'][-1]['rss_bytes'] / GB:.2f} GB"
                 if "rss_bytes" in r["steps"][-1] else "")
              + (f"; setup {r['setup_s']:.1f} s" if "setup_s" in r else "")
              + (f"; whole subprocess {proc['wall_s']:.0f} s" if proc else "")
              + f"; other CPU load at most {row['background']:.2f} cores"
              + (f" ({len(r['shared_steps'])} step(s) shared with other work redone)"
                 if r.get("shared_steps") else "")
              + (" -- WARNING: machine shared, times unreliable" if row["background"] > BUSY_LIMIT
                 else ""))
        if meta:
            print("    " + ", ".join(f"{k} {v}" for k, v in meta.items()))
        if "cmd" in r:
            print("    " + r["cmd"])
    print(f"\nWhole benchmark: {wall / 60:.1f} min.")


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per runner")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="images per task per step")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every runner")
    ap.add_argument("--workdir", type=Path, default=REPO / ".bench")
    ap.add_argument("--runners", default=",".join(RUNNERS),
                    help=f"comma-separated subset of: {', '.join(RUNNERS)}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.workdir = args.workdir.resolve()
    wanted = [n.strip() for n in args.runners.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in RUNNERS]
    if unknown:
        sys.exit(f"unknown runner(s) {unknown}; known: {list(RUNNERS)}")

    t0 = time.perf_counter()
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fixture = ensure_fixture(args, logs)
    results = {}
    for name in wanted:
        results[name] = RUNNERS[name](args, fixture, logs)
        s = summarize(results[name])
        LOG.info("%s: %.2f s/step, peak RSS %.2f GB", name, s["s/step"], (s["rss"] or 0) / GB)
    report(args, fixture, results, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
