"""mergekit YAML configs (`merge_method`, `base_model`, `models: [{model, parameters}]`, `parameters`, `dtype`) as
rankmerge jobs, for the methods whose result rankmerge reproduces exactly.

- `linear`: θ = Σ_i w_i θ_i (/ Σ_i w_i when `normalize`, the default) over the listed models. Written as task
  arithmetic from an origin (`base_model` when listed, else the first model): θ = θ_o + Σ_{i≠o} (w_i / W) τ_i.
- `task_arithmetic`: θ = θ_0 + λ Σ_i w_i τ_i over the models other than `base_model` (/ Σ_i w_i when `normalize`,
  default off; a sum below 1e-8 in magnitude divides by 1, as mergekit does). λ: the top-level `lambda`, default 1.
- `ties`: rankmerge's `ties_mergekit` with each model's `weight` and `density` (`normalize` default on, `lambda`).
- `breadcrumbs`, `breadcrumbs_ties`: rankmerge's methods of the same names (deterministic, mergekit's outlier and
  magnitude cuts) with each model's `weight`, `density` and `gamma` (`normalize` and `rescale` default off, `lambda`).

Per-model `parameters` override the top-level ones. Model paths are relative to the current directory (as mergekit
reads them); `org/name` ids come from the local Hugging Face cache. A LoRA reference `model: BASE+ADAPTER` (mergekit's
syntax for the model the adapter makes) is a PEFT adapter input on the base, when BASE is the model the task vectors
start from; the result then equals mergekit's up to float32 rounding (mergekit forms BASE + s·B·A densely and
subtracts BASE again). The `dare_*` methods are refused: mergekit draws its own random masks (and rescales by the L1
norm), so the result would not be mergekit's.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from rankmerge.service.model_ids import resolve_model_ref
from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)

EXACT = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
NOT_EXACT = ("dare_ties", "dare_linear", "della", "della_linear")
BREADCRUMBS = ("breadcrumbs", "breadcrumbs_ties")
NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "breadcrumbs": False, "breadcrumbs_ties": False}
TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
MODEL_PARAMETERS = {"weight", "density", "gamma"}
PER_MODEL_DEFAULTS = {"density": 1.0, "gamma": 0.01}  # mergekit's
GLOBAL_PARAMETERS = MODEL_PARAMETERS | {"normalize", "int8_mask", "rescale", "lambda"}
DTYPES = ("float32", "float16", "bfloat16")
TINY_DIVISOR = 1e-8


def is_mergekit_config(data: dict[str, Any]) -> bool:
    return "merge_method" in data


def _fail(problem: str, fix: str) -> MergeInputError:
    return MergeInputError(f"mergekit config: {problem}", fix)


def _method(data: dict[str, Any]) -> str:
    method = data["merge_method"]
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise _fail(f"field {unknown[0]!r} is not supported", f"rankmerge reads {', '.join(sorted(TOP_LEVEL))}")
    if method in NOT_EXACT:
        raise _fail(f"merge_method {method!r} would not give mergekit's result (its random drop masks and rescaling "
                    "differ from rankmerge's)", "use a rankmerge spec with `method: dare` or `della` (see `rankmerge methods`)")
    if method not in EXACT:
        raise _fail(f"merge_method {method!r} is not one rankmerge reproduces", f"use one of: {', '.join(EXACT)}")
    return method


def _scalar(value: Any, name: str, where: str) -> float | bool:
    """mergekit also takes per-layer gradients and tensor filters; rankmerge takes one number per model."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return value
    raise _fail(f"{where}: parameter {name!r} is {value!r}", "give one finite number (gradients and filters are not supported)")


def _parameters(raw: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(f"{where}: `parameters` is not a mapping", "write `parameters: {weight: 0.5}`")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(f"{where}: parameter {unknown[0]!r} is not supported", f"use {', '.join(sorted(allowed))}")
    return {k: _scalar(v, k, where) for k, v in raw.items()}


def _models(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(model reference, its own parameters) per `models` entry."""
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail("`models` is missing or empty", "list the models: `models: [{model: org/name, parameters: {weight: 1.0}}]`")
    out = []
    for n, entry in enumerate(entries, 1):
        ref = entry.get("model") if isinstance(entry, dict) else None
        if not isinstance(ref, str) or ref.count("+") > 1 or "" in ref.split("+"):
            raise _fail(f"models entry {n} has model {ref!r}", "give `model:` a path or an org/name id, or BASE+ADAPTER for a LoRA")
        out.append((ref, _parameters(entry.get("parameters"), MODEL_PARAMETERS, f"model {ref}")))
    return out


def _weight(ref: str, own: dict[str, Any], shared: dict[str, Any]) -> float:
    weight = own.get("weight", shared.get("weight"))
    if weight is None:
        raise _fail(f"model {ref} has no `weight`", "give it `parameters: {weight: ...}` or set a top-level `parameters: {weight: ...}`")
    return float(weight)


def _task_name(ref: str, taken: set[str]) -> str:
    """A task name from the model's last path part (`org/vit-cars` -> vit-cars), unique and file-name safe."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(ref.rstrip("/")).name).lstrip("._-")[:80] or "model"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    taken.add(name)
    return name


def _origin_and_scale(method: str, refs: list[str], weights: list[float], base: str | None,
                      normalize: bool) -> tuple[str, float]:
    """The model the task vectors start from, and what the weights are divided by."""
    if method != "linear":
        if base is None:
            raise _fail(f"{method} needs `base_model`", "add `base_model:` (the model the others were fine-tuned from)")
        total = sum(w for r, w in zip(refs, weights) if r != base)
        return base, total if normalize and abs(total) >= TINY_DIVISOR else 1.0
    if base is not None and base not in refs:
        raise _fail("linear merges the listed models only, and `base_model` is not among them",
                    "list base_model under `models` with its weight, or drop `base_model`")
    total = sum(weights)
    if not normalize and abs(total - 1.0) > 1e-6:
        raise _fail(f"linear with `normalize: false` and weights summing to {total:g} scales the whole model",
                    "make the weights sum to 1, or keep `normalize: true`")
    return base or refs[0], total if normalize else 1.0


def _dtype(data: dict[str, Any]) -> str | None:
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _fail(f"dtype {dtype!r} is not supported", f"use one of: {', '.join(DTYPES)} (rankmerge computes in float32)")
    return dtype


def _check_tokenizer(data: dict[str, Any]) -> None:
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        raise _fail(f"tokenizer_source {source!r} is not supported", "rankmerge copies the base's tokenizer: use `tokenizer_source: base` or drop it")


def _method_params(method: str, weights: dict[str, float], per_model: dict[str, dict[str, float]], shared: dict[str, Any],
                   scale: float) -> tuple[str, dict[str, Any]]:
    """The rankmerge method and parameters for the per-task weights, densities and gammas (tasks other than the origin)."""
    densities = per_model["density"]
    if method not in BREADCRUMBS and set(per_model["gamma"].values()) != {PER_MODEL_DEFAULTS["gamma"]}:
        raise _fail(f"{method} has no `gamma`", "drop `gamma` (only breadcrumbs and breadcrumbs_ties take it)")
    if method in BREADCRUMBS:
        return method, {"weight": weights, "density": densities, "gamma": per_model["gamma"], "lambda": float(shared.get("lambda", 1.0)),
                        "normalize": bool(shared.get("normalize", False)), "rescale": bool(shared.get("rescale", False))}
    if method == "ties":
        if shared.get("rescale"):
            raise _fail("ties with `rescale: true` rescales kept entries to the L1 norm", "drop `rescale` (rankmerge keeps mergekit's default, false)")
        return "ties_mergekit", {"weight": weights, "density": densities, "normalize": bool(shared.get("normalize", True)),
                                 "lambda": float(shared.get("lambda", 1.0))}
    if set(densities.values()) != {1.0}:
        log.warning("mergekit config: %s does not sparsify; `density` is ignored (as mergekit ignores it)", method)
    factor = float(shared.get("lambda", 1.0)) if method == "task_arithmetic" else 1.0
    return "task_arithmetic", {"lambda": {name: factor * w / scale for name, w in weights.items()}}


def job_data_from_mergekit(data: dict[str, Any], cwd: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A rankmerge job dict (no `output`: it comes from --out) from a mergekit config, paths made absolute; and each
    path field's model as the config wrote it (for the message when it does not exist)."""
    method = _method(data)
    _check_tokenizer(data)
    shared = _parameters(data.get("parameters"), GLOBAL_PARAMETERS, "top level")
    models = _models(data)
    refs = [ref for ref, _ in models]
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise _fail(f"base_model is {base!r}", "give a path or an org/name id")
    # the base's weight matters only to linear (task_arithmetic and ties skip its zero task vector)
    weights = [0.0 if method != "linear" and ref == base else _weight(ref, own, shared) for ref, own in models]
    normalize = bool(shared.get("normalize", NORMALIZE_DEFAULT[method]))
    origin, scale = _origin_and_scale(method, refs, weights, base, normalize)
    if "+" in origin:
        raise _fail(f"the task vectors would start from {origin!r}, a LoRA reference",
                    "set `base_model:` to the plain model the adapters were trained on (for linear: list it first)")
    taken: set[str] = set()
    tasks: dict[str, str] = {}
    task_weights: dict[str, float] = {}
    per_model: dict[str, dict[str, float]] = {k: {} for k in PER_MODEL_DEFAULTS}
    written = {"base": origin}
    for (ref, own), weight in zip(models, weights):
        if ref == origin:
            continue  # its own task vector is zero: its weight only counts in the normalisation
        path = _adapter_on(ref, origin, cwd) if "+" in ref else ref
        name = _task_name(path, taken)
        tasks[name], written[f"models.{name}"] = _absolute(path, cwd, f"model {ref}"), ref
        task_weights[name] = weight
        for key, default in PER_MODEL_DEFAULTS.items():
            per_model[key][name] = float(own.get(key, shared.get(key, default)))
    if not tasks:
        raise _fail("no model besides the origin", "list at least one model other than base_model")
    rankmerge_method, params = _method_params(method, task_weights, per_model, shared, scale)
    job = {"base": _absolute(origin, cwd, "base_model"), "models": tasks, "method": rankmerge_method, "params": params}
    dtype = _dtype(data)
    if dtype is not None:
        job["out_dtype"] = dtype
    log.info("mergekit %s config: %s from %s with %s", method, rankmerge_method, origin, params)
    return job, written


def _adapter_on(ref: str, origin: str, cwd: Path) -> str:
    """The adapter of a `BASE+ADAPTER` reference, whose BASE must be the origin: a task vector is s·B·A from there."""
    model, adapter = ref.split("+")
    if _absolute(model, cwd, f"model {ref}") != _absolute(origin, cwd, "base_model"):
        raise _fail(f"model {ref!r} applies a LoRA to {model!r}, not to {origin!r} (the model the task vectors start from)",
                    f"write `model: {origin}+{adapter}` when the adapter was trained on it, or merge the adapter into "
                    "its model first (peft's merge_and_unload) and list that")
    return adapter


def _absolute(ref: str, cwd: Path, field: str) -> str:
    """A model path relative to the current directory (as mergekit reads it), or a cached `org/name` id."""
    resolved = Path(resolve_model_ref(ref, cwd, field))
    return str(resolved if resolved.is_absolute() else cwd / resolved)
