"""Input Gram matrices for RegMean: each task's own fine-tuned model over its own unlabeled inputs, one matrix
G = XᵀX / N per merged linear weight, X the N input rows that layer sees (tokens or patches; padding left out).

Like the teacher targets (workers/tta/teachers.py) they are constants of the job: computed once, one file per task in
the job directory (`grams/<task>.safetensors`) with the identity of the inputs and a checksum, reused on resume. The
merge reads them one tensor at a time, so memory stays at one layer's matrices for all tasks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from rankmerge.workers.atomic_io import read_checked, write_checked
from rankmerge.workers.checkpoint_reader import Checkpoint
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods.registry import GramLookup
from rankmerge.workers.plan import MergePlan
from rankmerge.workers.progress import progress
from rankmerge.workers.tta.adapters import TaskModels
from rankmerge.workers.tta.data import model_inputs, num_rows

log = logging.getLogger(__name__)
FOLDER = "grams"
CONV1D = "conv1d"  # metadata: keys stored [in, out] (GPT-2's Conv1D), not [out, in] as nn.Linear


def linear_layers(models: TaskModels, task: int) -> dict[str, tuple[torch.nn.Module, bool]]:
    """Merged key -> (the nn.Linear or Conv1D module whose weight it is, whether stored [out, in])."""
    by_param = {param: key for key, param in models.names[task].items()}
    layers = {}
    for name, module in models.model.named_modules():
        key = by_param.get(f"{name}.weight")
        if key is not None and isinstance(module, (torch.nn.Linear, Conv1D)):
            layers[key] = (module, isinstance(module, torch.nn.Linear))
    return layers


@torch.no_grad()
def task_grams(models: TaskModels, plan: MergePlan, ck: Checkpoint, task: int, data: dict[str, Tensor],
               batch: int, max_rows: int, device: torch.device = torch.device("cpu")) -> tuple[dict[str, Tensor], list[str]]:
    """Task `task`'s Gram matrix per linear layer over its first `max_rows` rows (each batch's in float32, their sum in
    float64), and the keys stored [in, out]. A layer the forward never calls has none (RegMean then averages it, as FusionBench).
    `models` on `device` (`TaskModels.on`), where the forwards and products run; the matrices come back to the host."""
    layers = linear_layers(models, task)
    if not layers:
        raise MergeInputError(f"regmean: task model {ck.name!r} has no linear layer among the merged tensors",
                              "use a model with nn.Linear/Conv1D layers, or another method")
    own = {e.key: ck.read(e.sources[task]).to(device, torch.float32) for e in plan.merged}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, Tensor] = {}
    last: list = [None, None, 0]  # the last input seen and its batch Gram: q, k and v projections share one input

    def record(key: str):
        def hook(module, args, output):
            if args[0] is not last[0]:
                x, mask = args[0], current.get("attention_mask")
                if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                    x = x[mask.bool()]  # padding tokens are not inputs of the task
                x = x.reshape(-1, x.shape[-1]).float()
                last[:] = [args[0], (x.T @ x).double(), x.shape[0]]  # per batch in fp32, summed over batches in fp64
            sums[key] = sums[key].add_(last[1]) if key in sums else last[1].clone()
            counts[key] = counts.get(key, 0) + last[2]
        return hook

    handles = [module.register_forward_hook(record(key)) for key, (module, _) in layers.items()]
    rows = min(num_rows(data), max_rows)
    try:
        for start in progress(iterable=range(0, rows, batch), desc=f"gram {ck.name}", leave=False):
            current = {k: v.to(device) for k, v in model_inputs(data, torch.arange(start, min(start + batch, rows))).items()}
            models.logits(own, task, current)
    finally:
        for handle in handles:
            handle.remove()
    grams = {key: (total / counts[key]).float().cpu().contiguous() for key, total in sums.items()}
    return grams, sorted(key for key in grams if not layers[key][1])


@dataclass(frozen=True)
class GramStore:
    """The job's Gram files, one per task in task order; `store(key)` -> ([T, n, n], stored [out, in]) or None."""

    paths: tuple[Path, ...]
    conv1d: frozenset[str]

    def __call__(self, key: str) -> tuple[Tensor, bool] | None:
        grams = []
        for path in self.paths:
            with safe_open(str(path), "pt") as f:
                if key not in f.keys():
                    return None
                grams.append(f.get_tensor(key))
        return torch.stack(grams), key not in self.conv1d


def prepare_grams(job_dir: Path, names: list[str], identity: str,
                  compute: Callable[[int], tuple[dict[str, Tensor], list[str]]]) -> GramStore:
    """Every task's Gram file: reused when it is intact and of this `identity`, else `compute(task)` and written."""
    folder = job_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    paths, conv1d = [], set()
    for t, name in enumerate(names):
        path = folder / f"{name}.safetensors"
        cached = read_checked(path, identity)
        if cached is None:
            grams, stored_in_out = compute(t)
            write_checked(path, save(grams, metadata={"identity": identity, CONV1D: json.dumps(stored_in_out)}), identity)
        else:
            log.info("regmean: reusing the Gram matrices of task %r", name)
        with safe_open(str(path), "pt") as f:
            conv1d.update(json.loads(f.metadata()[CONV1D]))
        del cached
        paths.append(path)
    return GramStore(tuple(paths), frozenset(conv1d))


def identity_grams(plan: MergePlan, tasks: int) -> GramLookup:
    """Stand-in Gram matrices (identities) of the right shapes: what the dry-run forecast times RegMean's solve on."""
    shapes = {e.key: e.shape for e in plan.merged}

    def lookup(key: str) -> tuple[Tensor, bool] | None:
        shape = shapes.get(key)
        return None if shape is None or len(shape) != 2 else (torch.eye(shape[1]).expand(tasks, -1, -1), True)

    return lookup
