"""Per-task sparsifiers and task-vector mixers of mergekit's breadcrumbs, della and sce, and FusionBench's magmax.

Pure torch on one tensor's task vectors; every function's docstring names the anchor rule (mergekit 0.1.5,
fusion-bench 0.2.33) it restates, with its tie and normalisation rules.
"""

from __future__ import annotations

import torch
from torch import Tensor

RESCALE_EPS = 1e-7  # mergekit: no rescale when either L1 norm is below this


def rescale_l1(tau: Tensor, kept: Tensor) -> Tensor:
    """mergekit's `rescale` (L1): scale the kept entries so their L1 norm equals the unsparsified one's."""
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def magnitude_outliers(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask as mergekit computes it: drop the ⌊γn⌋ largest-magnitude entries and then the smallest
    ones, keeping ⌊density·n⌋ (the outliers cut shrinks when both do not fit). Ties follow the sort order. density ≥ 1
    keeps all. As in mergekit, when ⌊γn⌋ = 0 the kept slice is empty: that tensor's task vector is dropped whole."""
    if density >= 1:
        return tau
    n = tau.numel()
    n_top = int(gamma * n)
    n_bottom = n - int(density * n) - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    order = torch.argsort(tau.abs().reshape(-1).float())
    mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
    mask[order[n_bottom:n - n_top if n_top > 0 else 0]] = 1  # mergekit slices [n_bottom:-n_top]: empty at n_top = 0
    return tau * mask.reshape_as(tau)


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities as mergekit computes them: per row (dim 1; a vector is one row), the
    magnitude rank r ∈ 1..m (ties by sort order) maps linearly to density − ε (smallest) … density + ε (largest).
    A row of one entry, where mergekit divides 0 by 0, gets the midpoint, density."""
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(tau.dtype)  # 0-based: (r − 1)
    span = rows.shape[1] - 1
    position = ranks / span if span > 0 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + position * 2 * epsilon).reshape(tau.shape)


def della_magprune(tau: Tensor, density: float, epsilon: float, seed: int) -> Tensor:
    """DELLA's drop (mergekit `della_magprune` without rescale): keep each entry with its MagPrune probability, drawn
    from a seeded generator (reproducible, not mergekit's draws). density ≥ 1 keeps all, ≤ 0 none."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand(tau.shape, generator=gen).to(tau.device)  # drawn on the host: the same drop on any device
    keep = draws < della_keep_probabilities(tau, density, epsilon)
    return tau * keep


def weighted_linear(kept: Tensor, weights: Tensor, normalize: bool) -> Tensor:
    """mergekit's task arithmetic mixer (no sign consensus): Σ_t w_t τ̂_t, divided by Σ_t w_t with `normalize`
    (a sum below 1e-8 in magnitude divides by 1)."""
    mixed = torch.tensordot(weights.to(kept.dtype), kept, dims=1)
    total = float(weights.sum())
    return mixed / total if normalize and abs(total) >= 1e-8 else mixed


def sce_variance_mask(taus: Tensor, select_topk: float) -> Tensor:
    """SCE's select step (mergekit `sce`): keep the ⌊select_topk · #nonzero-variance⌋ entries of highest variance
    across tasks (population variance; ties by topk order); ≥ 1 keeps all, ≤ 0 none."""
    if select_topk >= 1:
        return torch.ones(taus.shape[1:], dtype=taus.dtype, device=taus.device)
    var = taus.var(0, unbiased=False)
    count = int(int(torch.count_nonzero(var)) * select_topk) if select_topk > 0 else 0
    mask = torch.zeros(var.numel(), dtype=taus.dtype, device=taus.device)
    mask[torch.topk(var.reshape(-1), count).indices] = 1
    return mask.reshape(var.shape)


def sce(taus: Tensor, select_topk: float) -> Tensor:
    """SCE (mergekit `sce`), select–calculate–erase per tensor: mask by variance, task weights w_t = mean(τ_t²)
    normalised to sum 1 (uniform 1/T when that sum is below 1e-6), erase entries whose sign differs from the sign
    of Σ_t τ_t (a zero sum elects +; zero entries never agree), then Σ_t w_t τ_t over the agreeing tasks divided by
    their Σ w_t clamped to ≥ 1e-6."""
    selected = taus * sce_variance_mask(taus, select_topk)
    energy = selected.pow(2).reshape(len(taus), -1).mean(1)
    total = float(energy.sum())
    weights = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1.0 / len(taus))
    elected = torch.where(selected.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    kept = (selected.sign() == elected).to(taus.dtype) * weights.reshape((-1,) + (1,) * (taus.dim() - 1))
    return (selected * kept).sum(0) / kept.sum(0).clamp(min=1e-6)


def magmax(taus: Tensor) -> Tensor:
    """MagMax (FusionBench `magmax`): per entry, the task value of largest magnitude; on equal magnitudes the later
    task wins (folded in task order with ≥, as FusionBench and the MagMax release do). Unscaled."""
    best = taus[0].clone()
    for tau in taus[1:]:
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best
