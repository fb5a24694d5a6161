"""Scale benchmark: rankmerge vs mergekit 0.1.5 vs FusionBench 0.2.33, same checkpoints, one run.

    .venv/bin/python benchmarks/anchors.py --model vitl --tasks 20 \\
        --methods task_arithmetic,ties,dare,tsv_m,iso_c --json vitl.json
    .venv/bin/python benchmarks/anchors.py --model llama1b --tasks 8 \\
        --methods task_arithmetic,ties,dare,tsv_m --rankmerge-extra tsv_m:svd=randomized

The checkpoints are benchmarks/scale_models.py's (made or reused first): a ViT-L/14 CLIP vision
encoder base with T CLIPForImageClassification fine-tunes (fp16), or a TinyLlama-1.1B-shaped
Llama with T fine-tunes (bf16). For each method every tool that has it runs once, in a fresh
subprocess in its own venv, on the same directories, writing the input dtype; the table gives
wall time (the whole process: imports, load, merge, save), peak RSS (ru_maxrss of the child from
wait4, and the sampled RSS of its process tree), both as ratios to the matching rankmerge row, and
per method the speedup of rankmerge over the fastest anchor. A run whose tree passes --rss-limit
(or leaves the machine under 1 GB available) is killed and reported as OOM; one that outlives
--timeout as a timeout: FusionBench holds whole models (and flat copies) in RAM, so not fitting
is a result. Before each run the inputs are read once, untimed, when they fit in the page cache
(the 20 ViT-L checkpoints do; the 8 Llamas do not, and are left as the previous run left them),
pending writes are flushed, and the script waits for a quiet machine.

Correctness: a few tensors of every output are compared with rankmerge's (max |a-b| / max |b|,
and ||a-b|| / ||b - base||, the difference relative to the merged update); for task arithmetic
rankmerge's own tensors are also checked against a float64 reference. For the other methods the
differences are information: randomness and definitions differ (below). Outputs live under
<root>/out/<tool>-<method> and are deleted right after their comparison.

Matched hyper-parameters (each tool's own names):

| method | rankmerge | mergekit 0.1.5 | FusionBench 0.2.33 |
|---|---|---|---|
| TA | lambda 0.3 | task_arithmetic, weight 0.3 (normalize false by default) | TaskArithmeticAlgorithm, scaling_factor 0.3 |
| TIES | k 0.2, lambda 0.3, merge sum (scope model; scope tensor for the mergekit comparison) | ties, density 0.2, weight 0.3, normalize false | TiesMergingAlgorithm, threshold 0.2 (top 20%), scaling_factor 0.3, merge_func sum |
| DARE | p 0.5, lambda 0.3, rescale, seed 0 | dare_linear, density 0.5, weight 0.3 (rescale true by default), --random-seed 0 | DareTaskArithmetic, sparsity_ratio 0.5, scaling_factor 0.3, rescale, all tensors |
| TSV-M | alpha 1.0 | - (no such method) | TaskSingularVectorMerging, alpha 1.0 |
| Iso-C | alpha 1.0 | - (no such method) | ISO_C_Merge, scaling_factor 1.0 |
| SLERP (1 task) | t 0.3 | slerp, t 0.3 (base_model joins the models) | - |
| NuSLERP (2 tasks) | weight {t0: 1.0, t1: 0.6} | nuslerp, weight 1.0 / 0.6, with base_model | - |
| Karcher | max_iter 10, tol 1e-5, include_base true | karcher, max_iter 10, tol 1e-5 (base_model is one of its inputs) | - |
| Model Stock | filter_wise false | model_stock, filter_wise false | - |
| Breadcrumbs | weight 0.3, density 0.8, gamma 0.01, normalize false | breadcrumbs, the same | - |
| Breadcrumbs-TIES | weight 0.3, density 0.8, gamma 0.01, normalize true | breadcrumbs_ties, the same | - |
| DELLA | weight 0.3, density 0.5, epsilon 0.15, normalize, rescale, seed 0 | della, the same, --random-seed 0 | - |
| DELLA-linear | as DELLA, normalize false | della_linear, the same, --random-seed 0 | - |
| SCE | select_topk 0.5 | sce, select_topk 0.5 | - |
| MagMax | scaling_factor 0.5 | - | MagMaxAlgorithm, scaling_factor 0.5 (pool in float32) |
| WUDI | iter_num 20, lr 1e-5 | - | WUDIMerging, iter_num 20 (its lr is fixed at 1e-5; pool in float32) |
| RegMean | num_regmean_examples 32, reduce_non_diagonal_ratio 0.95, tta.data = <ck>/data | - | RegMeanAlgorithmForCLIP, the same, images from <ck>/data (fusionbench_merge.py file_regmean; pool in float32) |

What cannot be matched exactly:
- Arithmetic dtype. rankmerge computes in float32 and writes the input dtype; mergekit is given
  ``dtype: float32`` + ``out_dtype: <input>`` to do the same; FusionBench, loading every model in the
  dtype of its files as its pools do, does its arithmetic in fp16/bf16 (TSV-M's SVDs excepted:
  it upcasts those), so its TA differs from the others by fp16/bf16 rounding.
- TIES: rankmerge's default trims with one threshold per task over the whole model (TIES paper,
  FusionBench likewise); mergekit trims each tensor to its own top-k. mergekit is compared with
  rankmerge ``scope=tensor`` when rankmerge has that parameter. mergekit keeps exactly
  int(density*n) entries (ties broken by sort order), the others keep every entry >= the k-th
  magnitude. That matters on bf16 checkpoints: an update of ~1% of a weight is a few ulps, so
  |tau| takes few distinct values (a fifth of them exactly 0) and the 20% threshold falls inside
  a tie (on the Llama set ">= threshold" keeps ~27% of a tensor). Where the summed sign is 0, mergekit elects +, FusionBench the global majority sign
  (or 0), rankmerge the global majority sign (-1 if that is 0). mergekit elects signs from the
  weighted deltas (equal weights here, so the same).
- DARE: each tool draws its own random masks (the same distribution, not the same draws).
  mergekit's dare_linear rescales each tensor to its original L1 norm instead of by 1/(1-p).
- TSV-M / Iso-C: rankmerge factorises only 2-D weights inside the repeated blocks and averages
  (x alpha) every other tensor; FusionBench factorises every 2-D tensor, embeddings and position
  embeddings (and a Llama's lm_head) included. Both keep floor(r/T) components per task.
- DELLA: each tool draws its own random masks (same keep probabilities, not the same draws).
- MagMax, WUDI, RegMean: FusionBench's pool is loaded in float32 for these (``fusionbench_dtype``): its
  arithmetic then matches rankmerge's float32 one (in fp16, WUDI's lr-1e-5 Adam steps are below the
  weights' resolution), and the result is cast to the files' dtype before saving.
- WUDI runs 20 Adam steps per tensor here, not the 400 of FusionBench's config: 400 steps over
  every 2-D tensor take too long for this CPU benchmark; the rule per step is the same.
- RegMean: FusionBench's CLIP RegMean reads a named train split and a CLIP processor; here the
  images are the benchmark's own preprocessed files, the same rows for both tools.
- mergekit on the CLIP checkpoints: 0.1.5 has no CLIP architecture definition; its inferred
  fallback takes tensor names from transformers 5's CLIPVisionModel, which lack the
  ``vision_model.`` prefix the stored checkpoints (written the way transformers 4 and the hub
  write them, so FusionBench can read the base) carry; it then finds none of them, skips every
  weight and writes a model without weights, exit 0. The row says so; nothing is worked around.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from safetensors import safe_open

from measure import (  # benchmarks/ is on sys.path
    BUSY_LIMIT, REPO, Run, flush, measure, n_params, rel, tensor_index, wait_quiet, warm_page_cache)
from venvs import ensure_venv

if TYPE_CHECKING:  # torch is imported only by the checking subprocess (see checked)
    import torch

LOG = logging.getLogger("anchors")
BENCH = REPO / "benchmarks"
GB = 1e9
FAMILIES = {"vitl": {"dtype": "float16", "pool": "clip_vision"},
            "llama1b": {"dtype": "bfloat16", "pool": "causal_lm"}}
WRAPPERS = ("vision_model.",)  # CLIP names with and without it are one tensor (transformers 4 vs 5 naming)
NO_WEIGHTS = {("mergekit", "vitl"): "no CLIP architecture in mergekit 0.1.5; its inferred one misses the stored "
                                    "vision_model. names (module docstring)"}
COMPARED_TENSORS = 6


@dataclass(frozen=True)
class MethodSpec:
    """One merge, in each tool's own parameter names (see the table in the module docstring)."""

    rankmerge: dict
    mergekit: tuple[str, dict, dict] | None  # (merge_method, shared parameters, per-model parameters)
    fusionbench: dict | None  # None: FusionBench has no such method
    tasks: int | None = None  # merge only the first N task models (methods defined for a fixed number)
    fusionbench_dtype: str | None = None  # load FusionBench's pool in this dtype instead of the files' one
    data: bool = False  # reads each task's unlabeled data (<ck>/data/<task>.*): rankmerge runs a spec with tta.data


METHODS = {
    "task_arithmetic": MethodSpec({"lambda": 0.3}, ("task_arithmetic", {}, {"weight": 0.3}),
                                  {"scaling_factor": 0.3}),
    "ties": MethodSpec({"k": 0.2, "lambda": 0.3, "merge": "sum"},
                       ("ties", {"normalize": False}, {"weight": 0.3, "density": 0.2}),
                       {"scaling_factor": 0.3, "threshold": 0.2, "remove_keys": [], "merge_func": "sum"}),
    "dare": MethodSpec({"p": 0.5, "lambda": 0.3, "rescale": True, "seed": 0},
                       ("dare_linear", {}, {"weight": 0.3, "density": 0.5}),
                       {"scaling_factor": 0.3, "sparsity_ratio": 0.5, "only_on_linear_weights": False,
                        "rescale": True}),
    "tsv_m": MethodSpec({"alpha": 1.0}, None, {"alpha": 1.0, "exclude_keys": []}),
    "iso_c": MethodSpec({"alpha": 1.0}, None, {"scaling_factor": 1.0}),
    "slerp": MethodSpec({"t": 0.3}, ("slerp", {"t": 0.3}, {}), None, tasks=1),
    "nuslerp": MethodSpec({"weight": {"t0": 1.0, "t1": 0.6}}, ("nuslerp", {}, {"t0": {"weight": 1.0}, "t1": {"weight": 0.6}}),
                          None, tasks=2),
    "karcher": MethodSpec({"max_iter": 10, "tol": 1e-5, "include_base": True},
                          ("karcher", {"max_iter": 10, "tol": 1e-5}, {}), None),
    "model_stock": MethodSpec({"filter_wise": False}, ("model_stock", {"filter_wise": False}, {}), None),
    "breadcrumbs": MethodSpec({"weight": 0.3, "density": 0.8, "gamma": 0.01, "normalize": False},
                              ("breadcrumbs", {"normalize": False}, {"weight": 0.3, "density": 0.8, "gamma": 0.01}), None),
    "breadcrumbs_ties": MethodSpec({"weight": 0.3, "density": 0.8, "gamma": 0.01, "normalize": True},
                                   ("breadcrumbs_ties", {"normalize": True}, {"weight": 0.3, "density": 0.8, "gamma": 0.01}),
                                   None),
    "della": MethodSpec({"weight": 0.3, "density": 0.5, "epsilon": 0.15, "normalize": True, "rescale": True, "seed": 0},
                        ("della", {"normalize": True, "rescale": True}, {"weight": 0.3, "density": 0.5, "epsilon": 0.15}),
                        None),
    "della_linear": MethodSpec({"weight": 0.3, "density": 0.5, "epsilon": 0.15, "normalize": False, "rescale": True,
                                "seed": 0},
                               ("della_linear", {"normalize": False, "rescale": True},
                                {"weight": 0.3, "density": 0.5, "epsilon": 0.15}), None),
    "sce": MethodSpec({"select_topk": 0.5}, ("sce", {"select_topk": 0.5}, {}), None),
    "magmax": MethodSpec({"scaling_factor": 0.5}, None, {"scaling_factor": 0.5, "inplace": True},
                         fusionbench_dtype="float32"),
    "wudi": MethodSpec({"iter_num": 20, "lr": 1e-5}, None, {"iter_num": 20, "exclude_keys": None},
                       fusionbench_dtype="float32"),
    "regmean": MethodSpec({"num_regmean_examples": 32, "reduce_non_diagonal_ratio": 0.95}, None,
                          {"num_regmean_examples": 32, "reduce_non_diagonal_ratio": 0.95, "weight_transpose": True,
                           "exclude_param_names_regex": []}, fusionbench_dtype="float32", data=True),
}


@dataclass
class Context:
    """Everything the runs of one benchmark share."""

    model: str
    ck: Path  # checkpoint set: base/, t0/ ...
    tasks: list[str]
    family: dict
    rankmerge: Path
    mergekit: Path  # mergekit-yaml
    mergekit_methods: set[str]
    fusionbench: Path  # python of FusionBench's venv
    extras: dict[str, list[dict]]
    outs: Path
    logs: Path
    base_count: int
    params: int
    versions: str = ""
    compare: int = COMPARED_TENSORS  # tensors compared per output (0: every common float tensor)

    @property
    def inputs(self) -> list[Path]:
        """Every weight file a merge reads."""
        return [f for d in ("base", *self.tasks) for f in sorted((self.ck / d).glob("*.safetensors"))]


@dataclass
class Job:
    """One tool run of one method; `ref` names the rankmerge row it is compared and divided by."""

    tool: str
    method: str
    label: str
    cmd: list[str]
    out: Path | None
    ref: str = "rankmerge"
    status: str = "pending"
    detail: str = ""
    wall: float = math.nan
    rss: int = 0
    tree: int = 0
    background: float = 0.0
    cache: str = ""  # page cache before the run: warm, or as the previous run left it (inputs too large)
    checks: dict = field(default_factory=dict)

    def row(self, ref: Job | None) -> dict:
        """What the table and the JSON show."""
        ok = self.status == "ok" and ref is not None and ref.status == "ok"
        return {**{k: v for k, v in asdict(self).items() if k not in ("cmd", "out")},
                "cmd": " ".join(rel(c) for c in self.cmd),
                "time_ratio": self.wall / ref.wall if ok else None,
                "rss_ratio": self.rss / ref.rss if ok else None}


# --------------------------------------------------------------------------- setup
def ensure_checkpoints(model: str, tasks: int, root: Path, layers: int | None) -> Path:
    """Make or reuse the checkpoint set (scale_models.py, own process: its memory is gone after)."""
    out = root / (model if layers is None else f"{model}-{layers}l")  # a dev override never touches the full set
    cmd = [sys.executable, str(BENCH / "scale_models.py"), model, "--tasks", str(tasks), "--out", str(out)]
    subprocess.run(cmd + (["--layers", str(layers)] if layers else []), check=True, stdout=subprocess.DEVNULL)
    return out


def take_lock(path: Path) -> TextIO:
    """One run at a time per root: runs share the output directories and would spoil each other's timings.

    Returns the locked file: closing it (the end of its with-block) releases the lock.
    """
    handle = open(path, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        LOG.info("another benchmark run holds %s; waiting for it to finish", rel(str(path)))
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def mergekit_methods(python: Path) -> set[str]:
    """Merge methods the installed mergekit registers (what it supports, asked of the package itself)."""
    code = ("import json; from mergekit.merge_methods import registry; "
            "print(json.dumps([m.spec.name for m in registry.registered_methods()]))")
    return set(json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True,
                                         text=True).stdout.strip().splitlines()[-1]))


def rankmerge_params(rankmerge: Path, method: str) -> set[str]:
    """Parameter names rankmerge's `method` accepts (from its schema): which variants exist."""
    text = subprocess.run([str(rankmerge), "schema", "--method", method], check=True, capture_output=True,
                          text=True).stdout
    return set(json.loads(text).get("properties", {}))


def parse_extras(values: list[str]) -> dict[str, list[dict]]:
    """--rankmerge-extra METHOD:k=v[,k=v] -> {method: [params, ...]}."""
    extras: dict[str, list[dict]] = {}
    for value in values:
        method, _, pairs = value.partition(":")
        extras.setdefault(method, []).append(dict(p.split("=", 1) for p in pairs.split(",") if p))
    return extras


# --------------------------------------------------------------------------- commands
def rankmerge_job(rankmerge: Path, ck: Path, tasks: list[str], method: str, params: dict, outs: Path,
                  variant: dict | None = None) -> Job:
    """rankmerge merge with the matched parameters (plus a variant's overrides); a method that reads data runs a
    spec whose `tta.data` names each task's data file."""
    variant = variant or {}
    tag = ",".join(f"{k}={v}" for k, v in variant.items())
    label = f"rankmerge {tag}" if tag else "rankmerge"
    out = outs / (f"rankmerge-{method}" + (f"-{tag.replace(',', '-').replace('=', '_')}" if tag else ""))
    if METHODS[method].data:
        spec = {"base": str(ck / "base"), "models": {t: str(ck / t) for t in tasks}, "method": method,
                "params": {**params, **variant}, "output": str(out), "overwrite": True,
                "tta": {"data": {t: str(data_file(ck, t)) for t in tasks}}}
        path = outs.parent / "logs" / f"rankmerge-{method}.yml"
        path.write_text(json.dumps(spec, indent=1) + "\n")  # JSON is YAML
        return Job("rankmerge", method, label, [str(rankmerge), "merge", str(path)], out)
    sets = [a for k, v in {**params, **variant}.items() for a in ("--set", f"{k}={fmt(v)}")]
    cmd = [str(rankmerge), "merge", "--base", str(ck / "base"),
           *[a for t in tasks for a in ("--model", f"{t}={ck / t}")],
           "--method", method, *sets, "--out", str(out), "--overwrite"]
    return Job("rankmerge", method, label, cmd, out)


def data_file(ck: Path, task: str) -> Path:
    """The task's unlabeled data that scale_models.py wrote (images .safetensors, or prompts .jsonl)."""
    return next(p for p in sorted((ck / "data").glob(f"{task}.*")) if p.suffix in (".safetensors", ".jsonl"))


def fmt(value: object) -> str:
    """A parameter as `--set` spells it (booleans lower-case, mappings as JSON)."""
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def mergekit_config(path: Path, spec: tuple[str, dict, dict], ck: Path, tasks: list[str], dtype: str) -> None:
    """mergekit's YAML: float32 arithmetic, output in the input dtype (see the module docstring)."""
    name, shared, per_model = spec
    lines = [f"merge_method: {name}", f"base_model: {ck / 'base'}", "dtype: float32", f"out_dtype: {dtype}"]
    if shared:
        lines.append("parameters: " + json.dumps(shared))
    lines.append("models:")
    for t in tasks:
        own = per_model.get(t, per_model)  # {task: parameters} where the models differ
        lines += [f"  - model: {ck / t}"] + ([f"    parameters: {json.dumps(own)}"] if own else [])
    path.write_text("\n".join(lines) + "\n")


def mergekit_job(mergekit: Path, ck: Path, tasks: list[str], method: str, outs: Path, configs: Path,
                 dtype: str, ref: str, extra_flags: list[str], label: str = "mergekit") -> Job:
    """mergekit-yaml with its default CLI options (and --random-seed for the random methods)."""
    spec = METHODS[method].mergekit
    cfg = configs / f"mergekit-{method}.yml"
    mergekit_config(cfg, spec, ck, tasks, dtype)
    out = outs / f"{label.replace(' ', '-')}-{method}"
    seed = ["--random-seed", "0"] if spec[0].startswith(("dare", "della")) else []
    cmd = [str(mergekit), str(cfg), str(out), "--no-copy-tokenizer", *seed, *extra_flags]
    return Job("mergekit", method, label, cmd, out, ref=ref)


def fusionbench_job(python: Path, ck: Path, tasks: list[str], method: str, outs: Path, family: dict) -> Job:
    """benchmarks/fusionbench_merge.py in FusionBench's venv: its pool, its algorithm class."""
    out = outs / f"fusionbench-{method}"
    spec = METHODS[method]
    params = [a for k, v in spec.fusionbench.items() for a in ("--param", f"{k}={json.dumps(v)}")]
    data = [a for t in tasks for a in ("--data", f"{t}={data_file(ck, t)}")] if spec.data else []
    cmd = [str(python), str(BENCH / "fusionbench_merge.py"), "--pool", family["pool"],
           "--dtype", spec.fusionbench_dtype or family["dtype"], "--out-dtype", family["dtype"],
           "--base", str(ck / "base"), *[a for t in tasks for a in ("--model", f"{t}={ck / t}")],
           "--method", method, *params, *data, "--out", str(out)]
    return Job("fusionbench", method, "fusionbench", cmd, out)


def unsupported(tool: str, method: str, reason: str) -> Job:
    """A row for a method the tool does not have: nothing runs."""
    return Job(tool, method, tool, [], None, status="not supported", detail=reason)


# --------------------------------------------------------------------------- checking
def canonical(index: dict[str, Path]) -> dict[str, str]:
    """Name without wrapper prefixes -> stored name."""
    out = {}
    for key in index:
        name = key
        for prefix in WRAPPERS:
            name = name.removeprefix(prefix)
        out[name] = key
    return out


def read(index: dict[str, Path], key: str) -> torch.Tensor:
    """One tensor as float64 (only in the checking subprocess: torch is imported there)."""
    with safe_open(index[key], "pt") as f:
        return f.get_tensor(key).double()


def sample_names(names: list[str], count: int) -> list[str]:
    """Evenly spread over the sorted names: embeddings, early and late blocks, norms."""
    names = sorted(names)
    step = max(1, len(names) // count)
    return names[::step][:count]


def is_float(index: dict[str, Path], key: str) -> bool:
    """From the header alone: F16, BF16, F32, F64 are floats."""
    with safe_open(index[key], "numpy") as f:
        return "F" in f.get_slice(key).get_dtype()


def sampled(ck: Path, *dirs: Path, count: int = COMPARED_TENSORS) -> tuple[list[str], list[dict[str, Path]], list[dict[str, str]]]:
    """A few float tensor names present in the base and in every dir, with each dir's index and names."""
    idx = [tensor_index(d) for d in (ck / "base", *dirs)]
    names = [canonical(i) for i in idx]
    common = [n for n in names[0] if all(n in other for other in names[1:]) and is_float(idx[0], names[0][n])]
    return (sample_names(common, count) if count > 0 else sorted(common)), idx, names


def compare(out: Path, ref: Path, ck: Path, count: int = COMPARED_TENSORS) -> dict:
    """max |a-b| / max |b| and ||a-b|| / ||b - base|| (float64) over a few tensors; a = `out`, b = rankmerge's `ref`."""
    sample, (i_base, i_out, i_ref), (n_base, n_out, n_ref) = sampled(ck, out, ref, count=count)
    result = {"tensors": len(sample), "max_rel": 0.0, "delta_rel": 0.0}
    for name in sample:
        a, b, base = read(i_out, n_out[name]), read(i_ref, n_ref[name]), read(i_base, n_base[name])
        result["max_rel"] = max(result["max_rel"], float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
        result["delta_rel"] = max(result["delta_rel"], float((a - b).norm() / (b - base).norm().clamp(min=1e-30)))
    return result


def ta_reference_error(out: Path, ck: Path, tasks: list[str], lam: float, count: int = COMPARED_TENSORS) -> dict:
    """max |out - (base + lambda * sum(ft - base))| / max |reference| over a few tensors, float64 reference."""
    sample, (i_base, i_out, *i_tasks), (n_base, n_out, *n_tasks) = sampled(ck, out, *(ck / t for t in tasks), count=count)
    worst = 0.0
    for name in sample:
        base = read(i_base, n_base[name])
        ref = base + lam * sum(read(i, n[name]) - base for i, n in zip(i_tasks, n_tasks))
        got = read(i_out, n_out[name])
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30)))
    return {"ref_rel": worst}


def checked(kind: str, **kwargs) -> dict:
    """Run compare / ta_reference_error in a fresh process and return its JSON.

    Reading tensors here would raise this process's peak RSS, and every later child's ru_maxrss
    starts from that peak (measure.py), so the tensors are read in a process of their own.
    """
    arg = json.dumps({"kind": kind, **{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}})
    text = subprocess.run([sys.executable, __file__, "--_check", arg], check=True, capture_output=True,
                          text=True).stdout
    return json.loads(text.strip().splitlines()[-1])


def check_main(arg: str) -> None:
    """Entry of the checking subprocess: print the result as one JSON line."""
    spec = json.loads(arg)
    paths = {k: Path(spec[k]) for k in ("out", "ref", "ck") if k in spec}
    if spec["kind"] == "compare":
        result = compare(paths["out"], paths["ref"], paths["ck"], spec["count"])
    else:
        result = ta_reference_error(paths["out"], paths["ck"], spec["tasks"], spec["lam"], spec["count"])
    print(json.dumps(result))


def check_weights(job: Job, base_count: int, model: str) -> None:
    """A run that exits 0 but writes no (or too few) weights did not merge the model."""
    written = len(tensor_index(job.out)) if job.out.exists() else 0
    if written == 0:
        job.status = "not supported"
        job.detail = "wrote a model without weights, exit 0" + (f"; {NO_WEIGHTS[job.tool, model]}"
                                                                if (job.tool, model) in NO_WEIGHTS else "")
    elif written < base_count:
        job.status, job.detail = "failed", f"wrote {written} of {base_count} tensors"
    if job.status != "ok":
        LOG.warning("%s %s: %s (%s)", job.label, job.method, job.status, job.detail)


# --------------------------------------------------------------------------- running
def execute(job: Job, ctx: Context, args: argparse.Namespace) -> None:
    """Measure one job (warm inputs, flushed writes, quiet machine, memory guard, timeout) and record it."""
    shutil.rmtree(job.out, ignore_errors=True)
    shutil.rmtree(job.out.with_name(job.out.name + ".job"), ignore_errors=True)  # a data pass's cache: never reused
    job.cache = "warm" if warm_page_cache(ctx.inputs) else "as left"
    flush()
    wait_quiet(args.quiet_wait)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    log = ctx.logs / f"{job.label.replace(' ', '_').replace('=', '_')}-{job.method}.log"
    run: Run = measure(job.cmd, log, env, rss_limit=args.rss_limit * GB, timeout=args.timeout)
    job.status, job.detail = run.status, run.detail
    job.wall, job.rss, job.tree, job.background = run.wall, run.rss, run.tree, run.background
    if job.status == "oom":  # detail: "tree RSS .. > limit .." or "machine down to .. available"
        job.status = "OOM"
    LOG.info("%s %s: %s %.1f s, peak RSS %.2f GB (tree %.2f GB), other CPU load %.2f cores%s", job.label,
             job.method, job.status, job.wall, job.rss / GB, job.tree / GB, job.background,
             f" ({job.detail})" if job.detail else "")


def plan(method: str, ctx: Context, args: argparse.Namespace) -> list[Job]:
    """The runs of one method: rankmerge (and its variants) first, then each anchor that has the method."""
    spec, tools = METHODS[method], set(args.tools.split(","))
    tasks = ctx.tasks[:spec.tasks]
    jobs = [rankmerge_job(ctx.rankmerge, ctx.ck, tasks, method, spec.rankmerge, ctx.outs)]
    mergekit_ref = "rankmerge"
    if method == "ties" and "scope" in rankmerge_params(ctx.rankmerge, "ties"):
        jobs.append(rankmerge_job(ctx.rankmerge, ctx.ck, tasks, method, spec.rankmerge, ctx.outs,
                                  {"scope": "tensor"}))
        mergekit_ref = jobs[-1].label
    jobs += [rankmerge_job(ctx.rankmerge, ctx.ck, tasks, method, spec.rankmerge, ctx.outs, extra)
             for extra in ctx.extras.get(method, [])]
    if "mergekit" in tools:
        if spec.mergekit is None or spec.mergekit[0] not in ctx.mergekit_methods:
            jobs.append(unsupported("mergekit", method, "mergekit 0.1.5 has no such merge method"))
        else:
            flags = {"mergekit": [], **({"mergekit tuned": args.mergekit_tuned.split()} if args.mergekit_tuned else {})}
            jobs += [mergekit_job(ctx.mergekit, ctx.ck, tasks, method, ctx.outs, ctx.logs,
                                  ctx.family["dtype"], mergekit_ref, extra, label) for label, extra in flags.items()]
    if "fusionbench" in tools:
        jobs.append(fusionbench_job(ctx.fusionbench, ctx.ck, tasks, method, ctx.outs, ctx.family) if spec.fusionbench
                    is not None else unsupported("fusionbench", method, "FusionBench 0.2.33 has no such merge method"))
    return jobs


def check(job: Job, ref: Job | None, ctx: Context, method: str) -> None:
    """Compare a finished output with its rankmerge row's; rankmerge's TA also with a float64 reference."""
    check_weights(job, ctx.base_count, ctx.model)
    if job.status != "ok" or ref is None or ref.status != "ok":
        return
    lam = float(METHODS[method].rankmerge.get("lambda", 1.0))
    if job is ref:
        if method == "task_arithmetic":
            job.checks = checked("ta_reference", out=job.out, ck=ctx.ck, tasks=ctx.tasks, lam=lam, count=ctx.compare)
    else:
        job.checks = checked("compare", out=job.out, ref=ref.out, ck=ctx.ck, count=ctx.compare)
    if job.checks:
        LOG.info("%s %s vs %s: %s", job.label, method, ref.label if job is not ref else "float64 TA", job.checks)


def run_method(method: str, ctx: Context, args: argparse.Namespace) -> list[Job]:
    """Run every job of a method; compare each output with its rankmerge row's and delete it right away."""
    jobs = plan(method, ctx, args)
    by_label = {j.label: j for j in jobs if j.tool == "rankmerge"}
    for job in jobs:
        if job.status != "pending":
            continue
        execute(job, ctx, args)
        if job.status == "ok":
            check(job, by_label.get(job.ref), ctx, method)
        if job.tool != "rankmerge" and not args.keep:
            shutil.rmtree(job.out, ignore_errors=True)
    if not args.keep:
        for job in by_label.values():
            shutil.rmtree(job.out, ignore_errors=True)
    return jobs


# --------------------------------------------------------------------------- report
def cell(value: float | None, digits: int = 2) -> str:
    """A number for the table; blank when there is none."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    """The markdown table of every row, in run order."""
    head = ("| tool | method | status | wall s | peak RSS GB | tree RSS GB | time ratio | RSS ratio | vs row "
            "| max rel diff | delta rel diff |\n|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    lines = [head]
    for r in rows:
        ran = r["status"] not in ("not supported", "pending")
        status = r["status"] if not r["detail"] else f"{r['status']} ({r['detail']})"
        checks = r["checks"] if "max_rel" in r["checks"] else None
        lines.append(f"| {r['label']} | {r['method']} | {status} | {cell(r['wall'], 1) if ran else ''} "
                     f"| {cell(r['rss'] / GB) if ran else ''} | {cell(r['tree'] / GB) if ran else ''} "
                     f"| {cell(r['time_ratio'])} | {cell(r['rss_ratio'])} | {r['ref'] if r['ref'] != r['label'] else ''} "
                     f"| {format(checks['max_rel'], '.3g') if checks else ''} "
                     f"| {format(checks['delta_rel'], '.3g') if checks else ''} |")
    return "\n".join(lines)


def speedups(jobs: list[Job]) -> list[str]:
    """Per method: the fastest anchor that finished, and rankmerge's speedup over it (vs that anchor's row)."""
    lines = []
    refs = {(j.method, j.label): j for j in jobs if j.tool == "rankmerge"}
    for method in dict.fromkeys(j.method for j in jobs):
        done = [j for j in jobs if j.method == method and j.tool != "rankmerge" and j.status == "ok"]
        if not done:
            lines.append(f"- {method}: no anchor finished")
            continue
        fastest = min(done, key=lambda j: j.wall)
        ref = refs.get((method, fastest.ref))
        if ref is None or ref.status != "ok":
            lines.append(f"- {method}: fastest anchor {fastest.label} {fastest.wall:.1f} s; rankmerge did not finish")
            continue
        lines.append(f"- {method}: {ref.label} {ref.wall:.1f} s vs fastest anchor {fastest.label} "
                     f"{fastest.wall:.1f} s: speedup {fastest.wall / ref.wall:.2f}x")
    return lines


def report(jobs: list[Job], ctx: Context) -> dict:
    """Print the table and notes; return the JSON document."""
    refs = {(j.method, j.label): j for j in jobs if j.tool == "rankmerge"}
    rows = [j.row(refs.get((j.method, j.ref))) for j in jobs]
    print(f"\n### {ctx.model}: {len(ctx.tasks)} tasks, {ctx.params / 1e6:.0f}M parameters per model, "
          f"{ctx.family['dtype']} ({rel(str(ctx.ck))})\n")
    print(table(rows))
    print("\nSpeedup of rankmerge vs the fastest anchor:\n" + "\n".join(speedups(jobs)))
    ta = [j.checks["ref_rel"] for j in jobs if "ref_rel" in j.checks]
    if ta:
        print(f"\nrankmerge TA vs float64 reference (max rel): {max(ta):.3g}")
    bg = max((j.background for j in jobs if j.status != "not supported"), default=0.0)
    print("\nwall = the whole process; peak RSS = ru_maxrss of the tool's process (wait4); tree RSS = peak of the "
          "summed RSS of its process tree, sampled every 50 ms; ratios = row / its 'vs' rankmerge row; max rel diff "
          "= max|a-b|/max|b| and delta rel diff = ||a-b||/||b-base|| over "
          f"{ctx.compare or 'all common float'} tensors, b = that rankmerge row's output.")
    caches = sorted({j.cache for j in jobs if j.cache})
    print(f"Page cache before each run: {', '.join(caches)}.")
    print(f"Other CPU load during the runs: at most {bg:.2f} cores (of {os.cpu_count()})"
          + (" -- WARNING: the machine was shared, times are unreliable" if bg > BUSY_LIMIT else ""))
    print(f"Versions: {ctx.versions}\nCommands:")
    for r in rows:
        if r["cmd"]:
            print(f"    {r['cmd']}")
    return {"model": ctx.model, "tasks": len(ctx.tasks), "params": ctx.params, "versions": ctx.versions,
            "rows": rows, "speedups": speedups(jobs)}


def versions(ctx: Context) -> str:
    """What was measured: rankmerge's commit, each anchor's package versions in its venv."""
    def pkgs(python: Path, names: tuple[str, ...]) -> str:
        """Versions of `names` as installed in the venv of `python`."""
        code = f"import importlib.metadata as m; print(*(m.version(p) for p in {names!r}))"
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    return (f"rankmerge @ {git} (torch {version('torch')}); mergekit/torch/transformers "
            f"{pkgs(ctx.mergekit.parent / 'python', ('mergekit', 'torch', 'transformers'))}; "
            f"fusion-bench/torch/transformers {pkgs(ctx.fusionbench, ('fusion-bench', 'torch', 'transformers'))}")


def main() -> None:
    """Parse the flags, take the root's lock, run the benchmark (or be the checking subprocess)."""
    if sys.argv[1:2] == ["--_check"]:  # the checking subprocess (see checked)
        return check_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--tasks", type=int, required=True)
    ap.add_argument("--methods", default="task_arithmetic", help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--tools", default="rankmerge,mergekit,fusionbench")
    ap.add_argument("--rankmerge-extra", action="append", default=[], metavar="METHOD:K=V[,K=V]",
                    help="an extra rankmerge row, e.g. tsv_m:svd=randomized (repeat)")
    ap.add_argument("--mergekit-tuned", default="", help="extra mergekit-yaml flags for an additional row, "
                    "e.g. '--out-shard-size 100M --async-write' (default: no such row)")
    ap.add_argument("--root", type=Path, default=REPO / ".bench" / "scale", help="checkpoints, outputs, logs")
    ap.add_argument("--layers", type=int, help="smaller models for development (own checkpoint directory)")
    ap.add_argument("--rss-limit", type=float, default=21.0, help="GB of process-tree RSS before a run is killed")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    ap.add_argument("--quiet-wait", type=float, default=180.0, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    ap.add_argument("--compare", type=int, default=COMPARED_TENSORS,
                    help="tensors compared per output, spread over the sorted names (0: every common float tensor)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        sys.exit(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")

    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    with take_lock(root / ".anchors.lock"):
        benchmark(args, root)


def benchmark(args: argparse.Namespace, root: Path) -> None:
    """Checkpoints, venvs, every method's runs, the report."""
    ck = ensure_checkpoints(args.model, args.tasks, root, args.layers)
    work = REPO / ".bench"
    mergekit_py = ensure_venv("mergekit", BENCH / "mergekit-requirements.txt", work)
    ctx = Context(model=args.model, ck=ck, tasks=[f"t{i}" for i in range(args.tasks)], family=FAMILIES[args.model],
                  rankmerge=Path(sys.executable).parent / "rankmerge", mergekit=mergekit_py.parent / "mergekit-yaml",
                  mergekit_methods=mergekit_methods(mergekit_py),
                  fusionbench=ensure_venv("fusionbench", BENCH / "fusionbench-requirements.txt", work),
                  extras=parse_extras(args.rankmerge_extra), outs=root / "out", logs=root / "logs",
                  base_count=len(tensor_index(ck / "base")), params=n_params(ck / "base"), compare=args.compare)
    ctx.outs.mkdir(parents=True, exist_ok=True)
    ctx.logs.mkdir(parents=True, exist_ok=True)
    ctx.versions = versions(ctx)  # before the runs: the tree may change while they go
    jobs = [job for method in args.methods.split(",") for job in run_method(method, ctx, args)]
    doc = report(jobs, ctx)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
