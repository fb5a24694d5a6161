"""Per-task unlabeled data streams: shuffled with a seed, cyclic, with a cursor that checkpoints and resumes exactly.

A task's data is a `.safetensors` or `.npz` file of preprocessed tensors with one row per example:
`pixel_values` (vision) or `input_ids` + `attention_mask` (text); an optional `labels` row is used only to evaluate.
npz files are opened with allow_pickle=False.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from workers.errors import MergeInputError
from workers.methods.elementwise import stable_seed

INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask")


def load_task_data(path: str | Path, task: str) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"data for task {task!r}: {path} does not exist", "point tta.data.<task> at a .safetensors or .npz file")
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                tensors = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
        else:
            raise MergeInputError(f"data for task {task!r}: {path.name} is neither .safetensors nor .npz", "convert the data")
    except (ValueError, OSError) as exc:
        raise MergeInputError(f"data for task {task!r}: cannot read {path.name} ({exc})", "re-export the data file") from None
    if not any(k in tensors for k in ("pixel_values", "input_ids")):
        raise MergeInputError(f"data for task {task!r} has no pixel_values or input_ids", f"found: {', '.join(tensors) or 'nothing'}")
    rows = {v.shape[0] for v in tensors.values()}
    if len(rows) != 1 or 0 in rows:
        raise MergeInputError(f"data for task {task!r}: tensors disagree on the number of examples ({sorted(rows)})", "give every tensor one row per example")
    return tensors


@dataclass
class TaskStream:
    """Cyclic, seeded, per-epoch shuffled batches; (epoch, position) is the whole state."""

    task: str
    tensors: dict[str, Tensor]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def _permutation(self) -> Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, self.task, self.epoch))
            self._order = torch.randperm(self.size, generator=gen)
        return self._order

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        parts, needed = [], batch_size
        while needed > 0:
            take = min(needed, self.size - self.position)
            parts.append(self._permutation()[self.position : self.position + take])
            self.position += take
            needed -= take
            if self.position == self.size:  # next epoch, new seeded order
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        index = torch.cat(parts)
        return {k: v[index] for k, v in self.tensors.items() if k in INPUT_KEYS}

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
