"""The data files the two adaptation protocols read, written into the results folder (the suite stays untouched).

- transductive: every test input of a task, with the labels removed — adaptation cannot read what is not there;
- held-out: a fixed seeded half of each task's test inputs to adapt on (labels removed), the other half (with labels)
  to report on. Every method, static ones included, is scored on that same report half, so the held-out table compares
  like with like.

Any format the suite uses (.safetensors, .npz, .jsonl, image folders) is read through the ordinary task-data loader and
written back as preprocessed .safetensors tensors, which the same loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rankmerge.service.suites import Suite
from rankmerge.workers.methods.elementwise import stable_seed
from rankmerge.workers.tta.data import load_task_data


@dataclass(frozen=True)
class ProtocolData:
    test_inputs: dict[str, Path]  # task -> all test inputs, no labels
    adapt: dict[str, Path]  # task -> held-out protocol: the half to adapt on, no labels
    report: dict[str, Path]  # task -> held-out protocol: the other half, with labels
    sizes: dict[str, dict[str, int]]


def heldout_split(n: int, seed: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapt, report) sorted indices: a fixed seeded half each (report gets the odd one out)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(seed, task, "heldout")))
    half = n // 2
    return perm[:half].sort().values, perm[half:].sort().values


def _save(tensors: dict[str, torch.Tensor], index: torch.Tensor | None, path: Path, labels: bool) -> Path:
    rows = {k: (v if index is None else v[index]).contiguous() for k, v in tensors.items() if labels or k != "labels"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(rows, str(path))
    return path


def write_protocol_data(suite: Suite, folder: Path, seed: int, max_length: int = 128) -> ProtocolData:
    """Write each task's label-free test inputs and its two held-out halves under folder/<task>/."""
    inputs, adapt, report, sizes = {}, {}, {}, {}
    for task, splits in suite.data.items():
        tensors = load_task_data(splits["test"], task, suite.base_dir, max_length)
        n = next(iter(tensors.values())).shape[0]
        first, second = heldout_split(n, seed, task)
        inputs[task] = _save(tensors, None, folder / task / "test-inputs.safetensors", labels=False)
        adapt[task] = _save(tensors, first, folder / task / "heldout-adapt.safetensors", labels=False)
        report[task] = _save(tensors, second, folder / task / "heldout-report.safetensors", labels=True)
        sizes[task] = {"test": n, "adapt": len(first), "report": len(second)}
    return ProtocolData(inputs, adapt, report, sizes)
