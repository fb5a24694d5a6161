"""Spectral merge math: one factorization abstraction for every SVD method. Pure torch: no I/O, no Ray.

A `SpectralFactorization` of one tensor's task vectors is (U, s, Vh, task_of_component, initial_mask). TA-SVD, CART,
TSV-M and Iso-CTS differ only in how they build it; a static spectral merge materialises it with its initial mask, and
AdaRank learns the mask over any of them (the `SpectralMethod` interface of workers/methods/registry.py). Formulas
follow docs/METHODS.md §3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rankmerge.workers.methods.svd import EXACT, SvdOptions, factored_top_svd, thin_svd, top_svd

LowRank = tuple[tuple[Tensor, Tensor] | None, ...]  # per task: τ_t = left @ right, or None (dense)

SHARED = -1  # task_of_component value for components that belong to no single task (Iso-CTS common block)


def polar(a: Tensor) -> Tensor:
    """Nearest matrix with orthonormal columns (rows, if wide): P Qᵀ from a = P D Qᵀ (orthogonal Procrustes)."""
    p, _, qh = thin_svd(a)
    return p @ qh


@dataclass
class SpectralFactorization:
    """Δ = U diag(mask ⊙ s ⊙ coef[task]) Vh, with R components drawn from T tasks (or shared)."""

    U: Tensor  # m × R
    s: Tensor  # R
    Vh: Tensor  # R × n
    task_of_component: Tensor  # R, int64; SHARED for common components
    initial_mask: Tensor  # R, bool

    def materialize(self, mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
        """The merged delta for a mask (default: the initial one); one GEMM."""
        mask = self.initial_mask if mask is None else mask
        coef = self.s * mask.to(self.s.dtype) * scale
        return (self.U * coef) @ self.Vh

    def truncated(self, cap: int | None) -> "SpectralFactorization":
        """At most `cap` leading components per owner (AdaRank's memory cap / mask range); None: all of them."""
        if cap is None:
            return self
        keep = torch.zeros_like(self.initial_mask)
        for owner in self.task_of_component.unique():
            keep[(self.task_of_component == owner).nonzero().flatten()[:cap]] = True
        return SpectralFactorization(self.U[:, keep], self.s[keep], self.Vh[keep], self.task_of_component[keep], self.initial_mask[keep])

    def kept_per_task(self, num_tasks: int, mask: Tensor | None = None) -> list[int]:
        mask = self.initial_mask if mask is None else mask
        return [int(mask[self.task_of_component == t].sum()) for t in range(num_tasks)]


def _top_mask(num_tasks: int, rank: int, keep: int, device: torch.device | None = None) -> Tensor:
    """Per task block of `rank` components, mark the first `keep` (components are in descending order)."""
    block = torch.arange(rank, device=device) < keep
    return block.repeat(num_tasks)


def per_task_factorization(taus: Tensor, keep: int | None = None, cap: int | None = None,
                           svd: SvdOptions = EXACT, low_rank: LowRank = ()) -> SpectralFactorization:
    """SVD of every τ_t (its top `cap` components; None: all), concatenated; the initial mask keeps each task's top
    `keep` (None: all it has). `low_rank`: τ_t's LoRA factors, where it has them, for an SVD from the factors."""
    full = min(taus.shape[1:])
    factors = [factored_top_svd(t, full if cap is None else cap, svd, low_rank[i] if low_rank else None)
               for i, t in enumerate(taus)]
    rank = factors[0][1].numel()
    num_tasks = taus.shape[0]
    return SpectralFactorization(
        U=torch.cat([f[0] for f in factors], dim=1),
        s=torch.cat([f[1] for f in factors]),
        Vh=torch.cat([f[2] for f in factors], dim=0),
        task_of_component=torch.arange(num_tasks, device=taus.device).repeat_interleave(rank),
        initial_mask=_top_mask(num_tasks, rank, rank if keep is None else min(keep, rank), taus.device),
    )


def cart_keep(rank: int, rho: float) -> int:
    """CART keeps max(1, ⌊ρ·r⌋) components per task."""
    return max(1, int(rho * rank))


def cart_factorization(centered: Tensor, rho: float, cap: int | None = None, svd: SvdOptions = EXACT) -> SpectralFactorization:
    """CART: factorize c_t = θ_t − θ̄ and keep the top max(1, ⌊ρ r⌋) components of each (`cap`: compute at most
    that many per task; the static merge needs only the kept ones, AdaRank may want more to switch on)."""
    rank = min(centered.shape[1:])
    return per_task_factorization(centered, keep=cart_keep(rank, rho), cap=cap, svd=svd)


def tsv_factorization(taus: Tensor, svd: SvdOptions = EXACT, cap: int | None = None, low_rank: LowRank = ()) -> SpectralFactorization:
    """TSV-M: top ⌊r/T⌋ components per task (at most `cap`), concatenated, then U and Vh replaced by their polar
    factors."""
    num_tasks = taus.shape[0]
    rank = min(taus.shape[1:])
    k = rank // num_tasks if cap is None else min(rank // num_tasks, cap)
    if k == 0:
        m, n = taus.shape[1:]
        return SpectralFactorization(
            *(torch.zeros(shape, dtype=dtype, device=taus.device) for shape, dtype in
              (((m, 0), torch.float32), (0, torch.float32), ((0, n), torch.float32), (0, torch.long), (0, torch.bool)))
        )
    factors = [factored_top_svd(t, k, svd, low_rank[i] if low_rank else None) for i, t in enumerate(taus)]
    u_hat = torch.cat([f[0] for f in factors], dim=1)
    s_hat = torch.cat([f[1] for f in factors])
    vh_hat = torch.cat([f[2] for f in factors], dim=0)
    return SpectralFactorization(
        U=polar(u_hat),
        s=s_hat,
        Vh=polar(vh_hat),
        task_of_component=torch.arange(num_tasks, device=taus.device).repeat_interleave(k),
        initial_mask=torch.ones(num_tasks * k, dtype=torch.bool, device=taus.device),
    )


def iso_c_factorization(taus: Tensor) -> SpectralFactorization:
    """Iso-C: SVD of M = Σ_t τ_t with every singular value replaced by their mean σ̄ (all components shared)."""
    u, s, vh = thin_svd(taus.sum(0))
    return SpectralFactorization(
        U=u,
        s=torch.full_like(s, float(s.mean())),
        Vh=vh,
        task_of_component=torch.full((s.numel(),), SHARED, dtype=torch.long, device=s.device),
        initial_mask=torch.ones(s.numel(), dtype=torch.bool, device=s.device),
    )


def iso_cts_split(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common components, components per task) exactly as the reference rounds them."""
    k_common = int(rank * common_fraction)
    per_task = round((rank - k_common) / num_tasks)
    per_task = min(per_task, rank // num_tasks)  # guard: never more task components than the rank holds
    return rank - per_task * num_tasks, per_task


def iso_cts_factorization(taus: Tensor, common_fraction: float = 0.8, svd: SvdOptions = EXACT) -> SpectralFactorization:
    """Iso-CTS: common subspace of Σ τ_t plus each task's top directions orthogonal to it; polar; isotropic σ̄."""
    num_tasks = taus.shape[0]
    rank = min(taus.shape[1:])
    k_common, per_task = iso_cts_split(rank, num_tasks, common_fraction)
    u_c, s_c, vh_c = top_svd(taus.sum(0), k_common, svd)
    us, ss, vhs, owners = [], [], [], []
    if per_task > 0:
        for t, tau in enumerate(taus):
            residual = tau.float() - u_c @ (u_c.T @ tau.float())
            ut, st, vht = top_svd(residual, per_task, svd)
            us.append(ut)
            ss.append(st)
            vhs.append(vht)
            owners.append(torch.full((per_task,), t, dtype=torch.long, device=taus.device))
    us.append(u_c)
    ss.append(s_c)
    vhs.append(vh_c)
    owners.append(torch.full((k_common,), SHARED, dtype=torch.long, device=taus.device))
    s_all = torch.cat(ss)
    return SpectralFactorization(
        U=polar(torch.cat(us, dim=1)),
        s=torch.full_like(s_all, float(s_all.mean())),
        Vh=polar(torch.cat(vhs, dim=0)),
        task_of_component=torch.cat(owners),
        initial_mask=torch.ones(s_all.numel(), dtype=torch.bool, device=s_all.device),
    )


def star_truncate(tau: Tensor, eta: float) -> tuple[Tensor, int]:
    """STAR: keep the fewest components holding η% of the singular-value mass; rescale to the original nuclear norm."""
    u, s, vh = thin_svd(tau)
    total = s.sum()
    if float(total) == 0.0:
        return torch.zeros_like(tau, dtype=torch.float32), 0
    cumulative = torch.cumsum(s, 0)
    keep = int(torch.searchsorted(cumulative, total * (eta / 100.0)).item()) + 1
    keep = min(keep, s.numel())
    kept = s[:keep] * (total / s[:keep].sum())
    return (u[:, :keep] * kept) @ vh[:keep], keep
