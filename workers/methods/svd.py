"""Truncated SVD, exact or randomized: the one place every spectral method gets its leading singular triplets from.

Why randomized: TSV-M keeps ⌊r/T⌋ components per task, CART ⌊ρr⌋, AdaRank at most `max_rank`; a full thin SVD of
every task vector computes all r of them. A randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4: a
Gaussian sketch of width k + oversample, `power_iters` orthonormalised power iterations, then an exact SVD of the
small projected matrix) costs O(m·n·(k+p)·(2q+2)) instead of O(m·n·min(m, n)), and never holds the full factors.
Its accuracy on the top singular values is measured by benchmarks/svd_accuracy.py (docs/PERFORMANCE.md).

Pure torch, deterministic: the sketch comes from a generator seeded by `SvdOptions.seed`, so a job refactorizes to
the same bits on resume and on every shard layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SvdAlgorithm = Literal["exact", "randomized"]


@dataclass(frozen=True)
class SvdOptions:
    algorithm: SvdAlgorithm = "exact"
    oversample: int = 10  # extra sketch columns beyond k: the error bound shrinks fast with them
    power_iters: int = 2  # each iteration sharpens a slowly decaying spectrum (σ_i^(2q+1) weighting)
    seed: int = 0


EXACT = SvdOptions()


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 thin SVD computed in the tall orientation (wide matrices are transposed: much faster on CPU)."""
    a = a.float()
    if a.shape[0] < a.shape[1]:
        u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(a, full_matrices=False)


def randomized_svd(a: Tensor, k: int, oversample: int = 10, power_iters: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Leading k singular triplets of `a` (fp32) from a seeded Gaussian sketch with power iterations."""
    a = a.float()
    wide = a.shape[0] < a.shape[1]
    if wide:
        a = a.T  # tall: the sketch lives in the short dimension
    width = min(k + oversample, a.shape[1])
    sketch = torch.randn(a.shape[1], width, generator=torch.Generator().manual_seed(seed)).to(a.device)  # host-drawn: device-independent
    q, _ = torch.linalg.qr(a @ sketch)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ ub[:, :k]
    s, vh = s[:k].contiguous(), vh[:k].contiguous()
    return (vh.T, s, u.T) if wide else (u, s, vh)


def top_svd(a: Tensor, k: int, options: SvdOptions = EXACT) -> tuple[Tensor, Tensor, Tensor]:
    """The leading min(k, rank) singular triplets (U m×k, s k, Vh k×n), components in descending order.

    A randomized request whose sketch would span the whole short dimension falls back to the exact SVD: no saving
    there, and the exact one is never worse.
    """
    rank = min(a.shape)
    k = min(k, rank)
    if options.algorithm == "randomized" and k + options.oversample < rank:
        return randomized_svd(a, k, options.oversample, options.power_iters, options.seed)
    u, s, vh = thin_svd(a)
    if k == rank:
        return u, s, vh
    return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous()  # contiguous copies free the full factors


def lowrank_svd(left: Tensor, right: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The exact leading k singular triplets of left @ right (m×r · r×n) without forming it: QR of both factors, SVD
    of the r×r core. Asked for more than its rank r, the components beyond are zero (σ = 0, zero vectors), not an
    arbitrary completion: TSV-M's polar step then whitens only the true directions (docs/METHODS.md §3)."""
    q_l, r_l = torch.linalg.qr(left.float())
    q_r, r_r = torch.linalg.qr(right.float().T)
    u, s, vh = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)
    u, vh = q_l @ u, vh @ q_r.T
    k = min(k, left.shape[0], right.shape[1])
    if k <= s.numel():
        return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous()
    extra = k - s.numel()
    return (torch.cat([u, u.new_zeros(u.shape[0], extra)], 1), torch.cat([s, s.new_zeros(extra)]),
            torch.cat([vh, vh.new_zeros(extra, vh.shape[1])], 0))


def factored_top_svd(dense: Tensor, k: int, options: SvdOptions = EXACT,
                     factors: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`top_svd` of a task vector, from its low-rank factors when it has them (exact at any k)."""
    return top_svd(dense, k, options) if factors is None else lowrank_svd(*factors, k)
