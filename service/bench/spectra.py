"""Spectral facts the plots need: each task vector's intrinsic rank, and which task owns each AdaRank mask entry.

The exported `adaptive/masks.safetensors` holds one flat hard mask per spectral tensor, in the component order of the
factorization that built it (workers/tta/state.py): per-task blocks in task order, then — for Iso-CTS only — the
shared common block. The block sizes follow from the mask length, so the owners need no stored index.
"""

from __future__ import annotations

import re
from contextlib import ExitStack

import torch

from service.suites import Suite
from workers.checkpoint_reader import ModelCheckpoint
from workers.methods.spectral import iso_cts_split
from workers.plan import build_plan
from workers.roles import Role
from workers.static_merge import load_inputs

SHARED = -1  # owner of the Iso-CTS common block
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


def component_owners(factorization: str, length: int, num_tasks: int, common_fraction: float = 0.8) -> torch.Tensor:
    """The owner task of each of a mask's `length` components (SHARED for Iso-CTS's common block).

    ta / cart: T blocks of the full rank; tsv_m: T blocks of ⌊r/T⌋; iso_cts: T blocks of the task-specific share, then
    the common block — its mask covers the whole rank r, so length = r. Masks truncated by max_rank/mask_range are not
    supported (the benchmark never truncates).
    """
    if factorization == "iso_cts":
        _, per_task = iso_cts_split(length, num_tasks, common_fraction)
        owners = torch.arange(num_tasks).repeat_interleave(per_task)
        return torch.cat([owners, torch.full((length - owners.numel(),), SHARED)])
    if length % num_tasks:
        raise ValueError(f"a {factorization} mask of {length} components does not split into {num_tasks} task blocks")
    return torch.arange(num_tasks).repeat_interleave(length // num_tasks)


def block_of(key: str) -> int | None:
    """The repeated-block (layer) number in a tensor name, e.g. 2 for encoder.layer.2.output.dense.weight."""
    match = BLOCK_INDEX.search(key)
    return int(match.group(1)) if match else None
