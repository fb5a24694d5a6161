"""Spectral facts the plots need: each task vector's intrinsic rank, and the repeated block of a tensor name.

Which task owns each AdaRank mask entry is exported by the job itself (`adaptive/owners.safetensors`).
"""

from __future__ import annotations

import re
from contextlib import ExitStack

import torch

from rankmerge.service.suites import Suite
from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.plan import build_plan
from rankmerge.workers.roles import Role
from rankmerge.workers.static_merge import load_inputs

BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def energy_rank(singular_values: torch.Tensor, energy: float = 0.95) -> int:
    """Smallest k whose top-k singular values hold `energy` of the squared Frobenius norm (0 for a zero matrix)."""
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64)).item()) + 1, squares.numel())


def intrinsic_ranks(suite: Suite, energy: float = 0.95) -> dict[str, list[int]]:
    """Per spectral tensor (base key): the energy rank of each task vector τ_t = θ_t − θ0, in the suite's task order."""
    with ExitStack() as stack:
        base = stack.enter_context(ModelCheckpoint(suite.base_dir, "base"))
        tasks = [stack.enter_context(ModelCheckpoint(path, name)) for name, path in suite.task_dirs.items()]
        plan = build_plan(base, {ck.name: ck for ck in tasks})
        ranks = {}
        for entry in plan.merged:
            if entry.role is Role.SPECTRAL:
                taus = load_inputs(entry, base, tasks).taus
                ranks[entry.key] = [energy_rank(torch.linalg.svdvals(tau), energy) for tau in taus]
        return ranks


def block_of(key: str) -> int | None:
    """The repeated-block (layer) number in a tensor name, e.g. 2 for encoder.layer.2.output.dense.weight."""
    match = BLOCK_INDEX.search(key)
    return int(match.group(1)) if match else None
