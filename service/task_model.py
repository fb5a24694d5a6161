"""One task's ready `transformers` model from a merged output.

A merged output's `config.json` and weights are the base's layout (the base's labels, or none), while each task's own
classifier head sits in `heads/<task>.safetensors` with the task model's config in that file's metadata. Here the
two are put back together: the task model's class and labels, the merged backbone, the task's head — in memory
(`load_task_model`) or as a plain HF folder that `AutoModelFor….from_pretrained` loads cleanly (`export_task_model`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
import transformers
from safetensors import safe_open
from transformers import PreTrainedModel

from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.checkpoint_writer import SKIPPED_SIDE_FILES, WEIGHT_SUFFIXES, check_output_free, staged_folder
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.roles import rules_for
from rankmerge.workers.publish import HEAD_CONFIG_KEY
from rankmerge.workers.tta.adapters import model_class

__all__ = ["load_task_model", "export_task_model", "task_names"]

log = logging.getLogger(__name__)
HEADS_DIR = "heads"
REPORT_NAME = "merge_report.json"


def _report(output: Path) -> dict:
    """The output's merge report ({} when absent): it names the tasks and where their models were."""
    path = output / REPORT_NAME
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        raise MergeInputError(f"{path} is not valid JSON", "restore the merged output's merge_report.json") from None


def task_names(output: str | Path) -> list[str]:
    """The tasks of a merged output: those its report names, else those with a head file."""
    output = Path(output)
    names = list(_report(output).get("models") or {})
    return names or sorted(p.stem for p in (output / HEADS_DIR).glob("*.safetensors"))


def _check_output(output: Path, task: str) -> None:
    if not (output / "config.json").is_file():
        raise MergeInputError(f"{output} is not a merged output (no config.json)", "pass the folder `rankmerge merge` or `run` wrote")
    names = task_names(output)
    if task not in names:
        raise MergeInputError(f"{output} has no task {task!r}", f"use one of: {', '.join(names) or '(none recorded)'}")


def _read_head(output: Path, task: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The task's head tensors (under the task model's names) and the file's metadata; empty when the task has no
    separate head (e.g. causal LMs: the merged model is the whole task model)."""
    path = output / HEADS_DIR / f"{task}.safetensors"
    if not path.is_file():
        return {}, {}
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _task_config(output: Path, task: str, head: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """The task model's config.json: from the head file; for outputs written before head files carried it, from the
    task model the report names; a task without a head is the merged model itself."""
    if HEAD_CONFIG_KEY in metadata:
        return json.loads(metadata[HEAD_CONFIG_KEY])
    source = (_report(output).get("models") or {}).get(task, {}).get("path")
    if source and (Path(source) / "config.json").is_file():
        return json.loads((Path(source) / "config.json").read_text())
    if head:
        raise MergeInputError(f"heads/{task}.safetensors in {output} does not record the task model's config, and the "
                              f"task model ({source or 'unknown path'}) is not there to read it from",
                              "merge again with this version of rankmerge (head files now carry the task's config)")
    return json.loads((output / "config.json").read_text())


def _model_class(config: dict, task: str) -> type[PreTrainedModel]:
    """The task model's class, only ever a transformers model class or this package's own (a config cannot make us
    import anything else)."""
    archs = config.get("architectures") or []
    cls = model_class(archs[0]) if len(archs) == 1 else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise MergeInputError(f"task {task!r}: config names architectures {archs}, not one transformers model class",
                              "set `architectures` in the task model's config.json to its class and merge again")
    return cls


def _target_dtype(weights: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """The merged backbone's dtype unless asked otherwise: the head follows it, as in adaptation and evaluation."""
    if dtype is not None:
        return dtype
    return next((w.dtype for w in weights.values() if w.is_floating_point()), torch.float32)


def _module_state(model: PreTrainedModel, weights: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint names (the base's, the head's) -> the task model's parameter names; the head is applied last, so a
    base's own head never wins."""
    place = _placer(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in [*weights.items(), *head.items()]:
        name = place(key)
        if name is None:
            log.debug("%s is not a parameter of %s: left out", key, type(model).__name__)
            continue
        state[name] = value.to(dtype) if value.is_floating_point() else value
    return state


def _placer(model: PreTrainedModel) -> Callable[[str], str | None]:
    """Where a checkpoint tensor goes in the task model: transformers' own load-time renaming (base-model prefix
    included), else the wrapper prefixes the merge planner strips from task models (e.g. CLIP's `vision_model.`), added
    or, for a model without the wrapper (transformers 5's CLIPVisionModel), removed."""
    from rankmerge.workers.tta.adapters import checkpoint_to_module_names

    to_module = checkpoint_to_module_names(model)
    prefixes = rules_for(model.config.to_dict()).prefixes
    expected = set(model.state_dict())

    def place(key: str) -> str | None:
        candidates = (to_module(key), key, *(p + key for p in prefixes), *(key.removeprefix(p) for p in prefixes))
        return next((c for c in candidates if c in expected), None)

    return place


def _check_complete(model: PreTrainedModel, task: str) -> None:
    """Every parameter must have come from the output: a missing one would be silently random."""
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise MergeInputError(f"task {task!r}: the output has no value for {len(missing)} parameter(s) of "
                              f"{type(model).__name__}, e.g. {missing[0]!r}", "check that the output is complete (merge again)")


def load_task_model(output: str | Path, task: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The merged model as task `task`'s own transformers class, with its head and its `id2label`, in eval mode.

    `dtype`: cast the weights (default: the merged backbone's dtype; the head is cast to it).
    """
    from accelerate import init_empty_weights

    output = Path(output)
    _check_output(output, task)
    head, metadata = _read_head(output, task)
    config_dict = _task_config(output, task, head, metadata)
    cls = _model_class(config_dict, task)
    config = transformers.AutoConfig.for_model(**config_dict)
    with ModelCheckpoint(output, "output") as merged:
        weights = {key: merged.read(key) for key in merged.keys()}
    target = _target_dtype(weights, dtype)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    model.load_state_dict(_module_state(model, weights, head, target), strict=False, assign=True)
    model.tie_weights()
    _check_complete(model, task)
    model.config.dtype = target
    log.info("loaded task %r from %s as %s (%d labels)", task, output, cls.__name__, model.config.num_labels)
    return model.eval()


def _copy_side_files(output: Path, target: Path) -> list[str]:
    """The output's tokenizer/processor files (not its config, weights, report or card, and nothing already written)."""
    copied = []
    for f in sorted(output.iterdir()):
        if f.is_file() and not (f.name in SKIPPED_SIDE_FILES or f.name.endswith(WEIGHT_SUFFIXES) or (target / f.name).exists()):
            shutil.copy2(f, target / f.name)
            copied.append(f.name)
    return copied


def export_task_model(output: str | Path, task: str, out_dir: str | Path, overwrite: bool = False,
                      dtype: torch.dtype | None = None) -> Path:
    """Write task `task` of a merged output as a plain HF folder (config with its labels, weights with its head),
    published atomically; returns the folder."""
    output, out_dir = Path(output).resolve(), Path(out_dir).resolve()
    _check_output(output, task)
    if out_dir == output or output in out_dir.parents or out_dir in output.parents:
        raise MergeInputError(f"--out {out_dir} overlaps the merged output {output}", "export to a separate folder")
    check_output_free(out_dir, overwrite)  # before the model is loaded
    model = load_task_model(output, task, dtype)
    with staged_folder(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        _copy_side_files(output, tmp)
    return out_dir
