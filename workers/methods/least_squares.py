"""Merges that minimise a quadratic objective per tensor: FusionBench's WUDI (data-free) and RegMean (input Gram
matrices). Pure torch on one tensor's task vectors; the docstrings name the fusion-bench 0.2.33 rule they restate.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def gram_product(rows: Tensor) -> Callable[[Tensor], Tensor]:
    """X ↦ X·RᵀR for a row stack R [r, n], associated the cheaper way: RᵀR (n×n) is formed once when n ≤ 2r (a
    call then costs n² per row of X, against 2rn), otherwise each call computes (X·Rᵀ)·R and nothing n×n is held."""
    if rows.shape[1] <= 2 * rows.shape[0]:
        gram = rows.T @ rows
        return lambda x: x @ gram
    return lambda x: (x @ rows.T) @ rows


def wudi_objective(taus: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """WUDI's loss L(τ) = Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F as the quadratic τAτᵀ − 2⟨τ, B⟩ + c with
    A = Σ_i τ_iᵀτ_i/‖τ_i‖², B = Σ_i τ_i τ_iᵀτ_i/‖τ_i‖²: returns (X ↦ X·A, B, c). Zero task vectors add nothing
    (FusionBench divides 0 by 0 there and gets NaN)."""
    norms = torch.linalg.vector_norm(taus.reshape(len(taus), -1), dim=1)
    live = norms > 0
    scaled = taus[live] / norms[live].reshape(-1, 1, 1)  # S_i = τ_i/‖τ_i‖, so A = Σ S_iᵀS_i
    times_a = gram_product(scaled.reshape(-1, taus.shape[-1]))
    b = torch.zeros_like(taus[0])
    c = taus.new_zeros(())
    for tau, s in zip(taus[live], scaled):
        own = gram_product(s)(tau)  # τ_i S_iᵀS_i
        b += own
        c += (own * tau).sum()
    return times_a, b, c


def wudi_loss(merged: Tensor, taus: Tensor) -> Tensor:
    """L(τ) in its closed quadratic form (equal to FusionBench's sum of squared projected interferences)."""
    times_a, b, c = wudi_objective(taus)
    return (times_a(merged) * merged).sum() - 2 * (b * merged).sum() + c


def wudi(taus: Tensor, iterations: int = 400, lr: float = 1e-5) -> Tensor:
    """WUDI merging (Cheng et al., arXiv 2503.08099; FusionBench `wudi`) of one 2-D tensor's task vectors [T, m, n]:
    start at Σ_i τ_i and take `iterations` Adam steps (lr, betas 0.9/0.999, eps 1e-8, no weight decay) on L(τ);
    the result is the merged task vector, unscaled. The gradient 2(τA − B) is exact and costs one m×n×n product
    per step whatever T is; the stationary point solves τA = B."""
    times_a, b, _ = wudi_objective(taus)
    merged = torch.nn.Parameter(taus.sum(0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    with torch.no_grad():
        for _ in range(iterations):
            merged.grad = (times_a(merged) - b).mul_(2)
            optimizer.step()
    return merged.detach()


def reduce_off_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """RegMean's regularised Gram: off-diagonal entries × ratio, the diagonal kept (FusionBench
    `reduce_non_diagonal_elements`)."""
    return gram * ratio + torch.diag(torch.diagonal(gram) * (1 - ratio))


def regmean(taus: Tensor, grams: Tensor, ratio: float, transposed: bool = True) -> Tensor:
    """RegMean (Jin et al., ICLR 2023; FusionBench `regmean`) of one linear layer: W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i in
    the layer's input space, G̃_i the task's input Gram matrix [T, n, n] with off-diagonals × ratio. Written on task
    vectors (the base's share cancels exactly) and solved in float64 rather than inverted. `transposed`: the weight is
    stored [out, in] (nn.Linear), else [in, out] (GPT-2's Conv1D)."""
    g = torch.stack([reduce_off_diagonal(x, ratio) for x in grams.double()])
    v = taus.double().transpose(1, 2) if transposed else taus.double()
    merged = torch.linalg.solve(g.sum(0), torch.einsum("tij,tjk->ik", g, v))
    return (merged.T if transposed else merged).to(taus.dtype)
