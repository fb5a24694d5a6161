"""Build the adaptive merge state from a plan: per tensor either a spectral factorization (AdaRank) or stacked task
vectors (elementwise tensors, and every tensor under AdaMerging), plus the initial λ table.

How masks attach (ALGORITHMS.md §1.3, our documented choices):
- ta:      origin θ0, full thin SVD of every τ_t, all components on; λ0 everywhere.        (AdaRank-TA ≡ TA(λ0) at init)
- cart:    origin θ̄, full SVD of θ_t − θ̄, top max(1,⌊ρr⌋) on; λ0 everywhere.              (≡ CART(λ0, ρ) at init)
- tsv_m:   origin θ0, TSV-M's whitened top-⌊r/T⌋ components per task (whitened once), all on; λ = α on spectral
           tensors, α/T on elementwise ones (≡ TSV-M(α) at init).
- iso_cts: origin θ0, Iso-CTS's orthogonalised components with the isotropic σ̄; task blocks masked by their task's
           mask and λ row, the common block by a shared mask and a shared λ row (row T); λ = α, α/T elementwise.
- none:    AdaMerging — every tensor elementwise, λ0 everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from workers.checkpoint_reader import ModelCheckpoint
from workers.methods import spectral as sp
from workers.methods.adaptive import TaskVectorSum
from workers.methods.svd import EXACT, SvdOptions
from workers.plan import MergePlan
from workers.roles import Role
from workers.static_merge import load_inputs

Factorization = Literal["ta", "cart", "tsv_m", "iso_cts", "none"]


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


def truncate(fac: sp.SpectralFactorization, cap: int | None) -> sp.SpectralFactorization:
    """Keep at most `cap` leading components per owner (memory cap / restricted mask range)."""
    if cap is None:
        return fac
    keep = torch.zeros_like(fac.initial_mask)
    for owner in fac.task_of_component.unique():
        idx = (fac.task_of_component == owner).nonzero().flatten()
        keep[idx[:cap]] = True
    return sp.SpectralFactorization(fac.U[:, keep], fac.s[keep], fac.Vh[keep], fac.task_of_component[keep], fac.initial_mask[keep])


def factorize(taus: Tensor, kind: Factorization, rho: float, common_fraction: float, cap: int | None = None,
              svd: SvdOptions = EXACT) -> sp.SpectralFactorization:
    """The factorization AdaRank's masks live on, with at most `cap` components per owner.

    TA and CART compute only the capped components (the saving that makes 20 × ViT-L fit); TSV-M and Iso-CTS are
    whitened over all their components first, then truncated, so their kept directions are exactly the static ones.
    """
    if kind == "ta":
        return sp.per_task_factorization(taus, cap=cap, svd=svd)
    if kind == "cart":
        return sp.cart_factorization(taus, rho, cap=cap, svd=svd)
    if kind == "tsv_m":
        return truncate(sp.tsv_factorization(taus, svd), cap)
    if kind == "iso_cts":
        return truncate(sp.iso_cts_factorization(taus, common_fraction, svd), cap)
    raise ValueError(f"unknown factorization {kind!r}")


def build_state(
    plan: MergePlan,
    base: ModelCheckpoint,
    tasks: list[ModelCheckpoint],
    kind: Factorization,
    lambda0: float,
    rho: float = 0.16,
    common_fraction: float = 0.8,
    mask_range: float | None = None,
    max_rank: int | None = None,
    factor_dtype: torch.dtype = torch.float32,
    columns: list[int] | None = None,
    svd: SvdOptions = EXACT,
    static: frozenset[str] = frozenset(),
) -> tuple[list[Slot], Tensor]:
    """Read every merged tensor once and build its slot; returns (slots, λ init of shape [T+1, K]).

    `columns` restricts the state to those indices of plan.merged (a shard's tensors); λ then has one column each.
    Elementwise keys in `static` keep only their merge at λ0 (an empty stack): their λ column gets no gradient.
    """
    num_tasks = len(tasks)
    whitened = kind in ("tsv_m", "iso_cts")
    slots: list[Slot] = []
    entries = plan.merged if columns is None else [plan.merged[c] for c in columns]
    lam = torch.empty(num_tasks + 1, len(entries))
    for k, entry in enumerate(tqdm(entries, desc=f"factorize ({kind})", leave=False, disable=None)):
        spectral = kind != "none" and entry.role is Role.SPECTRAL
        # elementwise stacks are read straight into the factor dtype (CART centres them in fp32 first)
        inputs = load_inputs(entry, base, tasks, torch.float32 if spectral or kind == "cart" else factor_dtype)
        origin, taus = inputs.base, inputs.taus
        if kind == "cart":
            mean = taus.mean(0)
            origin, taus = origin + mean, taus - mean
        lam[:, k] = lambda0 if (spectral or not whitened) else lambda0 / num_tasks
        if kind != "cart":  # the origin is the base itself: exact in the checkpoint's own (maybe 16-bit) dtype
            origin = origin.to(base.dtypes[entry.key])
        if not spectral and entry.key in static:
            merged = TaskVectorSum.apply(origin, lam[:num_tasks, k], taus)  # one task at a time, in fp32
            slots.append(ElementwiseSlot(entry.key, merged, taus.new_empty((0, *taus.shape[1:]))))
            continue
        if not spectral:
            slots.append(ElementwiseSlot(entry.key, origin, taus.to(factor_dtype)))
            continue
        rank = min(entry.shape)
        caps = [c for c in (max_rank, math.ceil(mask_range * rank) if mask_range is not None else None) if c is not None]
        fac = factorize(taus, kind, rho, common_fraction, min(caps) if caps else None, svd)
        owner = torch.where(fac.task_of_component < 0, num_tasks, fac.task_of_component)
        slots.append(SpectralSlot(entry.key, origin, fac.U.to(factor_dtype).contiguous(), fac.s.float(),
                                  fac.Vh.to(factor_dtype).contiguous(), owner, fac.initial_mask))
        del inputs, taus
    return slots, lam
