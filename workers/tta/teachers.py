"""Teacher targets: each task's own fine-tuned model (its backbone and head) on every row of that task's unlabeled
data, computed once before step 1 and cached in the job directory.

The teachers are frozen and the data is fixed, so the targets are constants: one forward per example and task in
the whole job, instead of one teacher forward per step. They feed the `distill` objective and the label-free guard
(workers/tta/guard.py). Classification keeps the N×C logits; causal LMs keep the top-k logits per token with their
vocabulary ids (k = TOP_K covers almost all probability mass; a full-vocabulary cache would be N·L·V floats).

The cache is `<job_dir>/teachers.safetensors` (`<task>/teacher_logits`, `<task>/teacher_index`), its metadata names
the job identity it was computed for and a sidecar holds its sha256: a resume reuses it only when both match, and
recomputes (same values: same inputs, same order) otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save
from torch import Tensor

from rankmerge.workers.atomic_io import read_checked, write_checked
from rankmerge.workers.checkpoint_reader import Checkpoint
from rankmerge.workers.plan import MergePlan
from rankmerge.workers.progress import progress
from rankmerge.workers.tta.adapters import TaskModels
from rankmerge.workers.tta.data import model_inputs, num_rows
from rankmerge.workers.tta.objectives import TEACHER_INDEX, TEACHER_LOGITS

log = logging.getLogger(__name__)
TOP_K = 64
CACHE = "teachers.safetensors"


@torch.no_grad()
def teacher_targets(models: TaskModels, plan: MergePlan, tasks: list[Checkpoint], datasets: list[dict[str, Tensor]],
                    batch: int, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> list[dict[str, Tensor]]:
    """Per task: the task model's outputs on every row (TEACHER_LOGITS, and TEACHER_INDEX for causal LMs), computed
    on `device` a batch at a time; the targets come back to the host (they are cached, and shipped to workers)."""
    out, on = [], models.on(device)
    for t, (ck, data) in enumerate(zip(tasks, datasets)):
        own = {e.key: ck.read(e.sources[t]).to(device, dtype) for e in plan.merged}
        values, index = [], []
        rows = num_rows(data)
        for start in progress(iterable=range(0, rows, batch), desc=f"teacher {ck.name}", leave=False):
            inputs = {k: v.to(device) for k, v in model_inputs(data, torch.arange(start, min(start + batch, rows))).items()}
            logits = on.logits(own, t, inputs).float()
            if models.output_kind == "causal_lm":
                top = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1)
                values.append(top.values.cpu())
                index.append(top.indices.to(torch.int32).cpu())
            else:
                values.append(logits.cpu())
        targets = {TEACHER_LOGITS: torch.cat(values)}
        if index:
            targets[TEACHER_INDEX] = torch.cat(index)
        out.append(targets)
        del own
    return out


def save_teachers(job_dir: Path, names: list[str], targets: list[dict[str, Tensor]], identity: str) -> Path:
    """Write the cache atomically with its identity and checksum (workers/atomic_io.py `write_checked`)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}/{key}": value.contiguous() for name, part in zip(names, targets) for key, value in part.items()}
    write_checked(job_dir / CACHE, save(flat, metadata={"identity": identity}), identity)
    return job_dir / CACHE


def load_teachers(job_dir: Path, names: list[str], identity: str) -> list[dict[str, Tensor]] | None:
    """The cached targets when they belong to this job and are intact; None otherwise (then recompute)."""
    data = read_checked(job_dir / CACHE, identity)
    return None if data is None else _per_task(load(data), names)


def read_teachers(path: Path, names: list[str]) -> list[dict[str, Tensor]]:
    """The cache split per task, in `names` order (workers read the file the driver verified and wrote)."""
    return _per_task(load_file(str(path)), names)


def _per_task(flat: dict[str, Tensor], names: list[str]) -> list[dict[str, Tensor]]:
    return [{key.split("/", 1)[1]: v for key, v in flat.items() if key.split("/", 1)[0] == name} for name in names]
