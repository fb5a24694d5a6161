"""FusionBench's layer-wise AdaMerging, one test-time-adaptation step at a time, timed.

Runs INSIDE FusionBench's own venv (benchmarks/fusionbench-requirements.txt), started
as a subprocess by benchmarks/tta_step.py, so its transformers<5 / lightning pins never
meet the project's .venv.

Two jobs:

* ``--prepare``: write the shared test-time-adaptation fixture under --models: a
  randomly initialised CLIP ViT-B/32-shaped vision encoder (base/), T "fine-tuned" copies
  (task_i/ = base + seeded Gaussian noise), per-task zero-shot-style heads and the
  projection (heads.safetensors) and fixed random images (inputs.safetensors). Every
  runner of tta_step.py reads the same files, so their losses can be compared too.
* default: build FusionBench's own merged model the way its
  ``CLIPLayerWiseAdaMergingAlgorithm`` does (its model pool, its
  ``construct_layer_wise_merged_model`` -> ``LayerWiseMergedModel``, its
  ``compute_logits`` and ``entropy_loss``, Lightning Fabric, Adam) with the settings of
  its ``method/adamerging/clip.yaml`` (init 0.3, lr 1e-3, no clamping), then run its
  step -- the body of ``LayerWiseAdaMergingAlgorithm.test_time_adaptation`` -- with timers
  around each of FusionBench's calls. Prints one JSON object as the last stdout line.

Offline and CPU only: nothing is fetched from a hub (HF_HUB_OFFLINE=1 is set here too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

LOG = logging.getLogger("fusionbench_adamerging_step")
# FusionBench's method/adamerging/clip.yaml (the CLIP layer-wise AdaMerging defaults)
FB_CONFIG = {"name": "clip_layer_wise_adamerging", "weights": None, "optimizer": "adam",
             "lr": 1e-3, "init_values": 0.3, "clamp_weights": False, "tie_weights": True,
             "strict": False, "devices": 1, "batch_size": 16, "num_workers": 0,
             "max_steps": 1000, "fast_dev_run": False, "save_merging_weights": False}
# CLIP ViT-B/32 vision tower (openai/clip-vit-base-patch32), built from config only
BUSY_LIMIT = 0.15  # cores of other work during a step that make its timing untrustworthy
VIT_B32 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
           "projection_dim": 512}


def task_names(n: int) -> list[str]:
    return [f"task_{i}" for i in range(n)]


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_bytes() -> int:
    """Current RSS: after a step it shows what the loop itself holds, which ru_maxrss
    (a peak that includes loading the nine models) cannot."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> tuple[float, float]:
    """(whole machine busy CPU s, this process's CPU s): a step that shared the 2 cores
    with other work shows up as background cores > 0 and is not to be trusted."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
    own = os.times()
    return busy, own.user + own.system


def wait_quiet(limit_s: float) -> float:
    """Between steps (untimed), wait until the machine has been idle for a second: another
    process on the 2 cores makes a step several times slower. Returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        busy0, _ = cpu_seconds()
        time.sleep(1.0)
        if cpu_seconds()[0] - busy0 < BUSY_LIMIT:
            break
    return time.monotonic() - t0


# --------------------------------------------------------------------------- fixture
def prepare(models: Path, spec: dict) -> None:
    """Write the fixture once; reuse it while spec.json matches (it takes ~1 min and 3 GB)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    spec_file = models / "spec.json"
    if (models / ".complete").exists() and spec_file.exists() \
            and json.loads(spec_file.read_text()) == spec:
        LOG.info("reusing fixture in %s", models)
        return
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    LOG.info("writing fixture to %s", models)
    torch.manual_seed(spec["seed"])
    cfg = CLIPVisionConfig(**VIT_B32)
    model = CLIPVisionModel(cfg).float().eval()
    model.save_pretrained(models / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(task_names(spec["tasks"]), start=1):
        gen = torch.Generator().manual_seed(spec["seed"] + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(base[k] + spec["noise"] * torch.randn(p.shape, generator=gen))
        model.save_pretrained(models / name)

    gen = torch.Generator().manual_seed(spec["seed"] + 1000)
    dim, width = VIT_B32["projection_dim"], VIT_B32["hidden_size"]
    heads = {"visual_projection.weight": torch.randn(dim, width, generator=gen) * width ** -0.5,
             # CLIP's initial logit_scale is ln(1/0.07); FusionBench multiplies by its exp
             "logit_scale": torch.tensor(2.6592)}
    for name in task_names(spec["tasks"]):
        w = torch.randn(spec["classes"], dim, generator=gen)
        heads[f"heads.{name}"] = w / w.norm(dim=-1, keepdim=True)  # like normalised text embeds
    save_file(heads, str(models / "heads.safetensors"))
    size = VIT_B32["image_size"]
    save_file({f"images.{name}": torch.randn(spec["batch"], 3, size, size, generator=gen)
               for name in task_names(spec["tasks"])}, str(models / "inputs.safetensors"))
    spec_file.write_text(json.dumps(spec))
    (models / ".complete").touch()


# --------------------------------------------------------------------------- FusionBench
def build(models: Path, tasks: list[str]):
    """FusionBench's own construction path; returns (algorithm, fabric, module, optimizer)."""
    import lightning as L
    from omegaconf import DictConfig
    from safetensors.torch import load_file

    from fusion_bench.method.adamerging.clip_layer_wise_adamerging import (
        CLIPLayerWiseAdaMergingAlgorithm,
    )
    from fusion_bench.modelpool import CLIPVisionModelPool

    pool = CLIPVisionModelPool(DictConfig({"_pretrained_": str(models / "base"),
                                           **{t: str(models / t) for t in tasks}}))
    algo = CLIPLayerWiseAdaMergingAlgorithm(DictConfig(FB_CONFIG))
    algo.modelpool = pool
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    algo.fabric = fabric

    module = algo.construct_layer_wise_merged_model(pool)  # prints the weight shape
    # on_test_time_adaptation_start() would build zero-shot heads from CLIP's text tower and
    # the task's class names (a hub download); set the same three attributes from the fixture.
    heads = load_file(str(models / "heads.safetensors"))
    proj = torch.nn.Linear(VIT_B32["hidden_size"], VIT_B32["projection_dim"], bias=False)
    proj.weight.data.copy_(heads["visual_projection.weight"])
    algo.visual_projection = fabric.to_device(proj.requires_grad_(False))
    algo.logit_scale_exp = fabric.to_device(heads["logit_scale"].exp())
    algo.zeroshot_weights = {t: fabric.to_device(heads[f"heads.{t}"]) for t in tasks}

    # test_time_adaptation(): Adam on merge_weight, Fabric setup, train mode, first merge
    optimizer = torch.optim.Adam([module.merge_weight], lr=FB_CONFIG["lr"])
    module, optimizer = fabric.setup(module, optimizer)
    module.train()
    module.merge_weights()
    return algo, fabric, module, optimizer


def step(algo, fabric, module, optimizer, images: dict, backward: str) -> dict:
    """One iteration of FusionBench's TTA loop, each of its calls timed separately.

    per-task (FusionBench's own loop): for each task forward + entropy + backward with
    retain_graph=True (the merged weights' graph is shared by all tasks), then Adam step,
    then merge_weights() for the next step. summed: all forwards, one backward of the
    summed entropies (same gradient, the merge graph is walked back once instead of T times).
    """
    from fusion_bench.method.adamerging.entropy_loss import entropy_loss

    clock = time.perf_counter
    t = {"forward": 0.0, "backward": 0.0}
    losses = []
    busy0, own0 = cpu_seconds()
    t_start = clock()
    if backward == "per-task":
        for task, x in images.items():
            t0 = clock()
            logits = algo.compute_logits(module, x, task)
            loss = entropy_loss(logits)
            t1 = clock()
            fabric.backward(loss, retain_graph=True)
            t2 = clock()
            t["forward"] += t1 - t0
            t["backward"] += t2 - t1
            losses.append(loss.item())
    else:
        t0 = clock()
        task_losses = [entropy_loss(algo.compute_logits(module, x, task))
                       for task, x in images.items()]
        loss = torch.stack(task_losses).sum()
        t1 = clock()
        fabric.backward(loss)
        t2 = clock()
        t["forward"], t["backward"] = t1 - t0, t2 - t1
        losses = [v.item() for v in task_losses]
    t0 = clock()
    optimizer.step()
    optimizer.zero_grad()
    t1 = clock()
    module.merge_weights()
    t2 = clock()
    t["optimizer"], t["merge"] = t1 - t0, t2 - t1
    t["total"] = t2 - t_start
    busy1, own1 = cpu_seconds()
    t["cpu_cores"] = (own1 - own0) / t["total"]
    t["background_cores"] = max(0.0, (busy1 - busy0 - (own1 - own0)) / t["total"])
    t["loss"] = sum(losses)
    t["rss_bytes"] = rss_bytes()
    return t


def run(args) -> dict:
    from importlib.metadata import version

    from safetensors.torch import load_file

    tasks = task_names(args.tasks)
    t0 = time.perf_counter()
    algo, fabric, module, optimizer = build(args.models, tasks)
    inputs = load_file(str(args.models / "inputs.safetensors"))
    images = {t: fabric.to_device(inputs[f"images.{t}"][: args.batch]) for t in tasks}
    setup_s = time.perf_counter() - t0
    setup_rss = max_rss_bytes()
    weight = module.merge_weight
    LOG.info("FusionBench merge_weight %s; setup %.1f s, RSS %.2f GB",
             tuple(weight.shape), setup_s, setup_rss / 1e9)

    # Each step starts once the machine is quiet; one that still shared the cores with other
    # work is timed again (up to --max-steps in all): the clean steps are the ones to median.
    records, clean = [], 0
    while len(records) < args.warmup + args.steps or (
            clean < args.steps and len(records) < args.warmup + args.max_steps):
        waited = wait_quiet(args.quiet_wait)
        rec = step(algo, fabric, module, optimizer, images, args.backward)
        rec["waited_s"] = waited
        rec["warmup"] = len(records) < args.warmup
        rec["shared"] = rec["background_cores"] > BUSY_LIMIT
        clean += not (rec["warmup"] or rec["shared"])
        records.append(rec)
        LOG.info("%s %d: %.2f s (merge %.2f, forward %.2f, backward %.2f, optimizer %.3f), "
                 "loss %.5f, own CPU %.2f cores, other work %.2f cores%s, waited %.0f s first",
                 "warm-up" if rec["warmup"] else "step", len(records) - 1, rec["total"],
                 rec["merge"], rec["forward"], rec["backward"], rec["optimizer"], rec["loss"],
                 rec["cpu_cores"], rec["background_cores"], " (shared)" if rec["shared"] else "",
                 waited)
    timed = [r for r in records if not r["warmup"]]
    if clean:  # keep the clean ones; the shared ones stay visible under "shared_steps"
        steps, shared = [r for r in timed if not r["shared"]], [r for r in timed if r["shared"]]
    else:
        steps, shared = timed, []
    encoder = module.pretrained_model
    return {
        "runner": "fusionbench",
        "steps": steps,
        "shared_steps": shared,
        "warmup": [r for r in records if r["warmup"]],
        "peak_rss_bytes": max_rss_bytes(),
        "setup_rss_bytes": setup_rss,
        "setup_s": setup_s,
        "meta": {
            "fusion-bench": version("fusion-bench"), "torch": torch.__version__,
            "transformers": version("transformers"), "lightning": version("lightning"),
            "threads": torch.get_num_threads(), "backward": args.backward,
            "tasks": args.tasks, "batch": args.batch,
            "merge_weight_shape": list(weight.shape),
            "encoder_params": sum(p.numel() for p in encoder.parameters()),
            "attn_implementation": getattr(encoder.config, "_attn_implementation", None),
            "merge_weight_after": {"min": weight.min().item(), "max": weight.max().item(),
                                   "mean": weight.mean().item()},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="fixture directory")
    ap.add_argument("--prepare", action="store_true", help="only write/reuse the fixture")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--noise", type=float, default=1e-3, help="std of the fine-tune perturbation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="timed steps at most, redoing steps shared with other work "
                         "(default 3 x --steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet-wait", type=float, default=300.0,
                    help="before each step, wait up to this many s for other work to stop")
    ap.add_argument("--json-out", type=Path, help="also write the result JSON here")
    ap.add_argument("--backward", choices=("per-task", "summed"), default="per-task",
                    help="per-task = FusionBench's own loop; summed = one backward per step")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.prepare:
        return prepare(args.models, {"tasks": args.tasks, "batch": args.batch,
                                     "classes": args.classes, "noise": args.noise,
                                     "seed": args.seed, **VIT_B32})
    if not (args.models / ".complete").exists():
        sys.exit(f"no fixture in {args.models}; run with --prepare first")
    spec = json.loads((args.models / "spec.json").read_text())
    if args.tasks > spec["tasks"] or args.batch > spec["batch"]:
        sys.exit(f"fixture has {spec['tasks']} tasks x {spec['batch']} images; asked for more")
    args.max_steps = args.max_steps or 3 * args.steps
    result = run(args)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
