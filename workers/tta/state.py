"""Build the adaptive merge state from a plan: per tensor either a spectral factorization (AdaRank) or stacked task
vectors (elementwise tensors, and every tensor under AdaMerging), plus the initial λ table.

The state reads only the `TaskVectorMethod` / `SpectralMethod` interface of workers/methods/registry.py, so AdaRank
over any registered spectral method equals that method at init: origin = θ0 plus the method's origin shift (CART: τ̄),
factorized tensors get its components, owners and initial mask with λ0 = its scale, the others its task weight
(TSV-M/Iso-CTS: α/T). AdaMerging starts from task arithmetic: nothing factorized.
Components that belong to no single task (Iso-CTS's common block) get a shared mask row and λ row T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.methods.adaptive import TaskVectorSum
from rankmerge.workers.methods.registry import TaskVectorMethod
from rankmerge.workers.plan import MergePlan, TensorPlan
from rankmerge.workers.static_merge import inputs_on, load_inputs


@dataclass
class SpectralSlot:
    key: str
    origin: Tensor  # m×n: fp32, or the base's dtype where it is the base itself
    U: Tensor  # m×R (factor dtype)
    s: Tensor  # R fp32
    Vh: Tensor  # R×n (factor dtype)
    owner: Tensor  # R int64: λ row of each component (T = shared)
    initial_mask: Tensor  # R bool


@dataclass
class ElementwiseSlot:
    key: str
    origin: Tensor  # fp32, or the base's dtype where it is the base itself
    taus: Tensor  # [T, ...] in the factor dtype, relative to the origin; [0, ...] for a static tensor (origin = its merge)


Slot = SpectralSlot | ElementwiseSlot


@dataclass(frozen=True)
class StateOptions:
    """How the state is laid out: AdaRank's memory caps, a shard's columns, tensors kept at their static merge."""

    factor_dtype: torch.dtype = torch.float32  # stored factors and elementwise task-vector stacks
    max_rank: int | None = None  # at most this many components per owner
    mask_range: float | None = None  # masks only over each owner's top fraction of the rank
    columns: tuple[int, ...] | None = None  # indices of plan.merged this state holds (a shard's); None: all
    static: frozenset[str] = frozenset()  # elementwise keys merged once at λ0 (an empty stack: no gradient)

    def cap(self, rank: int) -> int | None:
        caps = [c for c in (self.max_rank, math.ceil(self.mask_range * rank) if self.mask_range is not None else None) if c is not None]
        return min(caps) if caps else None


def build_state(plan: MergePlan, base: ModelCheckpoint, tasks: list[Checkpoint], method: TaskVectorMethod,
                options: StateOptions, device: torch.device = torch.device("cpu")) -> tuple[list[Slot], Tensor]:
    """Read every merged tensor once and build its slot on `device` (factorizations run there); returns (slots, λ init
    of shape [T+1, K] on `device`), one λ column per slot."""
    entries = plan.merged if options.columns is None else [plan.merged[c] for c in options.columns]
    lam = torch.empty(len(tasks) + 1, len(entries))
    slots: list[Slot] = []
    for k, entry in enumerate(tqdm(entries, desc=f"factorize ({method.name})", leave=False, disable=None)):
        slot, lam[:, k] = build_slot(entry, base, tasks, method, options, device)
        slots.append(slot)
    return slots, lam.to(device)


def build_slot(entry: TensorPlan, base: ModelCheckpoint, tasks: list[Checkpoint], method: TaskVectorMethod,
               options: StateOptions, device: torch.device = torch.device("cpu")) -> tuple[Slot, float]:
    """One tensor's slot (on `device`) and its initial λ."""
    factorized = method.factorized(entry.role, entry.shape)
    # elementwise stacks are read straight into the factor dtype (a shifted origin is computed in fp32 first)
    dtype = torch.float32 if factorized or method.centered else options.factor_dtype
    inputs = inputs_on(load_inputs(entry, base, tasks, dtype, pin=device.type == "cuda",
                                   factors_only=method.from_factors(entry.role, entry.shape)), device)
    origin, taus = inputs.base, inputs.taus
    shift = method.origin_shift(taus)
    if shift is None:  # the origin is the base itself: exact in the checkpoint's own (maybe 16-bit) dtype
        origin = origin.to(base.dtypes[entry.key])
    else:
        origin, taus = origin + shift, taus - shift
    if not factorized:
        weight = method.task_weight(len(tasks))
        if entry.key in options.static:
            merged = TaskVectorSum.apply(origin, torch.full((len(tasks),), weight, device=device), taus)  # one task at a time, in fp32
            return ElementwiseSlot(entry.key, merged, taus.new_empty((0, *taus.shape[1:]))), weight
        return ElementwiseSlot(entry.key, origin, taus.to(options.factor_dtype)), weight
    fac = method.factorize(taus, options.cap(min(entry.shape)), inputs.factors if shift is None else ())
    owner = torch.where(fac.task_of_component < 0, len(tasks), fac.task_of_component)
    slot = SpectralSlot(entry.key, origin, fac.U.to(options.factor_dtype).contiguous(), fac.s.float(),
                        fac.Vh.to(options.factor_dtype).contiguous(), owner, fac.initial_mask)
    return slot, method.scale()
