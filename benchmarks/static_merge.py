"""Static-merge benchmark: rankmerge vs mergekit on the very same checkpoints.

Task Arithmetic (base + 0.3 * sum(ft_i - base)) over three fine-tunes of a
randomly initialised ~300M-parameter fp32 Llama. Each tool runs in its own
fresh subprocess; we time it and read its peak RSS, then check that both
outputs agree with an independent reference, tensor by tensor. An I/O-floor
row (benchmarks/io_floor.py: read the same inputs, write and fsync an output
of the same size, no math) is timed the same way, for rankmerge / floor.

    .venv/bin/python benchmarks/static_merge.py [--repeats N] [--layers L]

Everything generated (checkpoints, mergekit's virtualenv, outputs, logs) lives
under --workdir (default .bench, git-ignored) and is reused on the next run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from measure import (  # benchmarks/ is on sys.path: this script's own directory
    BUSY_LIMIT, REPO, flush, measure, n_params, rel, tensor_index, wait_quiet)
from venvs import ensure_venv

LOG = logging.getLogger("static_merge")
MERGEKIT_REQS = REPO / "benchmarks" / "mergekit-requirements.txt"
FINETUNES = ("a", "b", "c")
LAMBDA = 0.3
GB = 1e9
FLOOR = "I/O floor"
TUNED = "mergekit (tuned)"
TOLERANCE = 1e-5  # relative to max|ref|: a few float32 ulps, far below any real mistake


# --------------------------------------------------------------------------- setup
def model_spec(args) -> dict:
    return {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
            "heads": args.heads, "vocab": args.vocab, "noise": args.noise, "seed": 0}


def ensure_models(root: Path, spec: dict) -> dict[str, Path]:
    """Generate base + fine-tunes once, in a subprocess so its memory stays out of the way."""
    dirs = {name: root / name for name in ("base", *(f"ft_{t}" for t in FINETUNES))}
    spec_file = root / "spec.json"
    done = all((d / ".complete").exists() for d in dirs.values())
    if done and spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        LOG.info("reusing checkpoints in %s", root)
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    LOG.info("generating checkpoints in %s", root)
    subprocess.run([sys.executable, __file__, "--_generate", str(root), json.dumps(spec)], check=True)
    spec_file.write_text(json.dumps(spec))
    return dirs


def generate(root: Path, spec: dict) -> None:
    """Random-init Llama (fp32, untied embeddings) + three seeded Gaussian-noise fine-tunes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    cfg = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["heads"], vocab_size=spec["vocab"],
                      tie_word_embeddings=False, dtype="float32")
    model = LlamaForCausalLM(cfg).float()

    def save(name: str) -> None:
        # transformers 5 always writes safetensors; 1GB shards -> several files + index.
        model.save_pretrained(root / name, max_shard_size="1GB")
        (root / name / ".complete").touch()

    save("base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, tag in enumerate(FINETUNES, start=1):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(base[k] + spec["noise"] * torch.randn(p.shape, generator=gen))
        save(f"ft_{tag}")


# --------------------------------------------------------------------------- measuring
def bench(runs: dict[str, tuple[list[str], Path]], logs: Path, repeats: int) -> list[dict]:
    """One warm-up per tool (fills the page cache; nothing is dropped), then `repeats`
    rounds that interleave the tools, so slow drift on the machine hits all of them alike.

    Before every run the previous run's dirty pages are flushed (sync, untimed), so one
    tool's output writeback is never billed to the next tool; a run that shared the CPU
    with other work is redone (up to 3 tries).
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    samples: dict[str, list[tuple[float, int, int, float]]] = {name: [] for name in runs}
    phases: dict[str, list[float]] = {name: [] for name in runs}  # rankmerge's own merge seconds (its report)
    for i in range(repeats + 1):
        for name, (cmd, out) in runs.items():
            for _ in range(3):
                shutil.rmtree(out, ignore_errors=True)
                flush()
                wait_quiet()
                log = logs / f"{name.replace(' ', '_').replace('/', '')}-{i}.log"
                run = measure(cmd, log, env)
                run.exit_unless_ok(cmd, log)
                wall, rss, tree, bg = run.wall, run.rss, run.tree, run.background
                LOG.info("%s %s: %.1f s, peak RSS %.2f GB (tree %.2f GB), background CPU %.2f cores",
                         name, "warm-up" if i == 0 else f"run {i}", wall, rss / GB, tree / GB, bg)
                if bg <= BUSY_LIMIT:
                    break
            if i:
                samples[name].append((wall, rss, tree, bg))
                report = out / "merge_report.json"
                if name == "rankmerge" and report.exists():
                    phases[name].append(json.loads(report.read_text())["wall_seconds"])
    # median over the measured runs (== the single run when --repeats 1)
    return [{"tool": name, "cmd": cmd, "out": out,
             "walls": [r[0] for r in samples[name]],
             "wall": statistics.median(r[0] for r in samples[name]),
             "rss": statistics.median(r[1] for r in samples[name]),
             "tree": statistics.median(r[2] for r in samples[name]),
             "background": max(r[3] for r in samples[name]),
             "phases": phases[name]}
            for name, (cmd, out) in runs.items()]


# --------------------------------------------------------------------------- checking
def load(index: dict[str, Path], key: str) -> torch.Tensor:
    with safe_open(index[key], "pt") as f:
        return f.get_tensor(key)


def verify(models: dict[str, Path], outputs: dict[str, Path]) -> dict[str, float]:
    """Max |out - ref| per tool, ref = base + λ·Σ(ft−base) in float64, one tensor at a time.

    Also the max |rankmerge - mergekit| over all tensors. A fast wrong merge is no win,
    so any tool off by more than float32 rounding fails the benchmark.
    """
    ins = {k: tensor_index(d) for k, d in models.items()}
    outs = {k: tensor_index(d) for k, d in outputs.items()}
    keys = set(ins["base"])
    for tool, idx in outs.items():
        if set(idx) != keys:
            sys.exit(f"{tool}: tensor names differ from base: {sorted(set(idx) ^ keys)[:5]}")
    err = {tool: 0.0 for tool in outs}
    pair = 0.0
    ref_max = 0.0
    for key in sorted(keys):
        base = load(ins["base"], key).double()
        ref = base + LAMBDA * sum(load(ins[f"ft_{t}"], key).double() - base for t in FINETUNES)
        ref_max = max(ref_max, ref.abs().max().item())
        got = {tool: load(idx, key) for tool, idx in outs.items()}
        for tool, t in got.items():
            if t.dtype != torch.float32:
                sys.exit(f"{tool}: {key} is {t.dtype}, expected float32")
            err[tool] = max(err[tool], (t.double() - ref).abs().max().item())
        if {"rankmerge", "mergekit"} <= got.keys():
            pair = max(pair, (got["rankmerge"] - got["mergekit"]).abs().max().item())
    for tool, e in err.items():
        if e > TOLERANCE * ref_max:
            sys.exit(f"{tool}: output differs from base + {LAMBDA}·Σ(ft−base) by up to {e:.3g}")
    return {"max|rankmerge-mergekit|": pair, "max|ref|": ref_max,
            **{f"max|{tool}-ref|": e for tool, e in err.items()}}


def ratios(results: list[dict]) -> str:
    """The goals, from the same run: rankmerge within 1.3x the I/O floor, mergekit tuned at 1.5x rankmerge or more.
    Each ratio of medians, then the same ratio round by round (the tools take turns, so a round shares its load)."""
    by = {r["tool"]: r for r in results}
    lines = []
    for num, den, goal in (("rankmerge", FLOOR, "<= 1.3"), (TUNED, "rankmerge", ">= 1.5")):
        if num in by and den in by:
            rounds = [a / b for a, b in zip(by[num]["walls"], by[den]["walls"])]
            lines.append(f"{num} / {den}: {by[num]['wall'] / by[den]['wall']:.2f} (goal {goal}; "
                         f"round by round {', '.join(f'{x:.2f}' for x in rounds)})")
    if by.get("rankmerge", {}).get("phases") and FLOOR in by:
        phase = by["rankmerge"]["phases"]
        rounds = [a / b for a, b in zip(phase, by[FLOOR]["walls"])]
        lines.append(f"rankmerge's merge alone (its report's wall_seconds: after starting Python and importing torch, "
                     f"{statistics.median(phase):.1f} s) / {FLOOR}: {statistics.median(phase) / by[FLOOR]['wall']:.2f} "
                     f"(round by round {', '.join(f'{x:.2f}' for x in rounds)})")
    return "\n" + "\n".join(lines) if lines else ""


# --------------------------------------------------------------------------- main
def versions(mergekit: Path) -> str:
    """What was measured: mergekit's and torch's versions in its venv, rankmerge's git commit."""
    py = mergekit.parent / "python"
    mk = subprocess.run([str(py), "-c", "import importlib.metadata as m; "
                         "print(*(m.version(p) for p in ('mergekit', 'torch', 'transformers')))"],
                        capture_output=True, text=True).stdout.split() or ["?"] * 3
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    return (f"rankmerge @ {git or '?'} (torch {torch.__version__}); mergekit {mk[0]} "
            f"(torch {mk[1]}, transformers {mk[2]}) in its own venv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / ".bench")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--noise", type=float, default=1e-3, help="std of the fine-tune perturbation")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per tool after one warm-up")
    ap.add_argument("--rankmerge", default=str(Path(sys.executable).parent / "rankmerge"))
    ap.add_argument("--mergekit-best", default="--out-shard-size 100M --async-write",
                    help="extra mergekit-yaml flags for its 'best CPU options' row ('' to skip)")
    ap.add_argument("--tools", default=f"rankmerge,mergekit,mergekit (tuned),{FLOOR}",
                    help="comma-separated subset of rows to run")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    ap.add_argument("--_generate", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args._generate:
        return generate(Path(args._generate[0]), json.loads(args._generate[1]))

    work = args.workdir.resolve()
    logs, outs = work / "logs", work / "out"
    logs.mkdir(parents=True, exist_ok=True)
    # mergekit gets its own venv so its pins never touch the project's .venv
    mergekit = ensure_venv("mergekit", MERGEKIT_REQS, work).parent / "mergekit-yaml"
    m = ensure_models(work / "llama300m", model_spec(args))
    params = n_params(m["base"])
    ckpt_gb = sum(f.stat().st_size for f in m["base"].glob("*.safetensors")) / GB
    LOG.info("model: %d parameters, %.2f GB per checkpoint", params, ckpt_gb)

    cfg = work / "mergekit-task_arithmetic.yml"
    cfg.write_text("merge_method: task_arithmetic\n"
                   f"base_model: {m['base']}\n"
                   "dtype: float32\n"
                   "models:\n" + "".join(
                       f"  - model: {m['ft_' + t]}\n    parameters: {{weight: {LAMBDA}}}\n"
                       for t in FINETUNES))

    runs = {  # name -> (command, output dir)
        "rankmerge": ([args.rankmerge, "merge", "--base", str(m["base"]),
                       *[a for t in FINETUNES for a in ("--model", f"{t}={m['ft_' + t]}")],
                       "--method", "task_arithmetic", "--set", f"lambda={LAMBDA}",
                       "--out", str(outs / "rankmerge"), "--overwrite"], outs / "rankmerge"),
        "mergekit": ([str(mergekit), str(cfg), str(outs / "mergekit"), "--no-copy-tokenizer"],
                     outs / "mergekit"),
    }
    if args.mergekit_best:
        runs[TUNED] = ([str(mergekit), str(cfg), str(outs / "mergekit-tuned"),
                        "--no-copy-tokenizer", *args.mergekit_best.split()], outs / "mergekit-tuned")
    inputs = sorted(f for d in m.values() for f in d.glob("*.safetensors"))
    runs[FLOOR] = ([sys.executable, str(REPO / "benchmarks" / "io_floor.py"), str(outs / "floor"),
                    "--write-like", str(m["base"]), *map(str, inputs)], outs / "floor")
    wanted = args.tools.split(",")
    version_line = versions(mergekit)  # before the runs: the tree may change while they go
    results = bench({k: v for k, v in runs.items() if k in wanted}, logs, args.repeats)

    checks = verify(m, {r["tool"]: r["out"] for r in results if r["tool"] != FLOOR})
    if not args.keep:
        shutil.rmtree(outs, ignore_errors=True)

    first = results[0]  # rankmerge unless --tools leaves it out
    print(f"\n### Static merge: Task Arithmetic, 3 × {params / 1e6:.0f}M Llama (fp32)\n")
    print(f"Model: {params:,} parameters ({args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, untied), "
          f"{ckpt_gb:.2f} GB per checkpoint. Wall time and RSS: median of {args.repeats} "
          f"run(s) after 1 warm-up, page cache warm.\n")
    print(f"| tool | wall s | peak RSS GB | tree RSS GB | time ratio (tool/{first['tool']}) "
          f"| RSS ratio (tool/{first['tool']}) | all runs, s |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['tool']} | {r['wall']:.1f} | {r['rss'] / GB:.2f} | {r['tree'] / GB:.2f} "
              f"| {r['wall'] / first['wall']:.2f} | {r['rss'] / first['rss']:.2f} "
              f"| {', '.join(f'{w:.1f}' for w in r['walls'])} |")
    print(ratios(results))
    print("\npeak RSS = ru_maxrss of the tool's process (wait4); tree RSS = peak of the summed "
          "RSS of its process tree, sampled every 50 ms.")
    bg = max(r["background"] for r in results)
    print(f"Other CPU load during the measured runs: at most {bg:.2f} cores (of {os.cpu_count()})"
          + (" -- WARNING: the machine was shared, times are unreliable" if bg > BUSY_LIMIT else "") + "\n")
    print("Agreement (float64 reference base + 0.3·Σ(ft−base)): " +
          ", ".join(f"{k} = {v:.4g}" for k, v in checks.items()) +
          f"; relative max|rankmerge-mergekit|/max|ref| = "
          f"{checks['max|rankmerge-mergekit|'] / checks['max|ref|']:.3g}")
    print(f"\nVersions: {version_line}")
    print("\nCommands:")
    for r in results:
        print("    " + rel(" ".join(r["cmd"])))
    print(f"mergekit config ({rel(str(cfg))}):\n" + "".join(
        "    " + rel(line) + "\n" for line in cfg.read_text().splitlines()))


if __name__ == "__main__":
    main()
