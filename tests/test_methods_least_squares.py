"""WUDI and RegMean (workers/methods/least_squares.py) against their formulas (docs/METHODS.md) in float64."""

import pytest
import torch

from rankmerge.workers.methods import least_squares as lsq
from rankmerge.workers.methods.registry import MergeContext, TensorInputs, make_method
from rankmerge.workers.roles import Role


def random_taus(shape, seed=0, tasks=3):
    return torch.randn(tasks, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def direct_wudi_loss(merged, taus):
    """FusionBench's WUDI loss as it writes it: Σ_i ‖(τ − τ_i) τ_iᵀ‖² / ‖τ_i‖²."""
    disturbing = merged.unsqueeze(0) - taus
    product = disturbing @ taus.transpose(1, 2)
    norms = taus.reshape(len(taus), -1).norm(dim=1).square()
    return (product.square() / norms.reshape(-1, 1, 1)).sum()


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (2, 40)])  # n ≤ 2T·m: A formed; n > 2T·m: (X Sᵀ) S
def test_wudi_quadratic_form_is_the_direct_loss(shape):
    taus = random_taus(shape)
    merged = random_taus(shape, seed=1, tasks=1)[0]
    torch.testing.assert_close(lsq.wudi_loss(merged, taus), direct_wudi_loss(merged, taus))


@pytest.mark.parametrize("shape", [(12, 5), (2, 40)])
def test_wudi_is_adam_on_the_direct_loss(shape):
    taus = random_taus(shape)
    reference = torch.nn.Parameter(taus.sum(0))
    optimizer = torch.optim.Adam([reference], lr=1e-3, weight_decay=0)
    for _ in range(25):
        optimizer.zero_grad()
        direct_wudi_loss(reference, taus).backward()
        optimizer.step()
    torch.testing.assert_close(lsq.wudi(taus, iterations=25, lr=1e-3), reference.detach())


def test_wudi_descends_to_the_least_squares_solution():
    taus = random_taus((8, 4))
    times_a, b, _ = lsq.wudi_objective(taus)
    closed = torch.linalg.solve(times_a(torch.eye(4, dtype=taus.dtype)), b.T).T  # τA = B, A symmetric
    merged = lsq.wudi(taus, iterations=4000, lr=1e-2)
    assert lsq.wudi_loss(merged, taus) < lsq.wudi_loss(taus.sum(0), taus)
    torch.testing.assert_close(merged, closed, atol=2e-3, rtol=0)
    stationarity = times_a(merged) - b
    assert float(stationarity.abs().max()) < 1e-2 * float(b.abs().max())


def merge_one(method, taus, role=Role.SPECTRAL, **params):
    m = make_method(method, params, MergeContext(tuple(f"t{i}" for i in range(len(taus))), taus[0].numel()))
    return m.merge(TensorInputs("layers.0.w", role, torch.zeros(taus.shape[1:]), taus.clone()))[0]


def test_wudi_method_defaults_and_other_tensors():
    taus = random_taus((6, 4)).float()
    torch.testing.assert_close(merge_one("wudi", taus), lsq.wudi(taus, 400, 1e-5))
    bias = random_taus((7,)).float()
    torch.testing.assert_close(merge_one("wudi", bias, Role.ELEMENTWISE), bias.mean(0))
    dead = torch.cat([taus[:2], torch.zeros(1, 6, 4)])  # an unchanged tensor of one task: no NaN (FusionBench: 0/0)
    assert torch.isfinite(merge_one("wudi", dead, iter_num=5)).all()


def test_regmean_formula_with_reduced_off_diagonals():
    taus, base = random_taus((5, 4)), random_taus((5, 4), seed=2, tasks=1)[0]
    xs = [random_taus((30, 4), seed=10 + t, tasks=1)[0] for t in range(3)]
    grams = torch.stack([x.T @ x / len(x) for x in xs])
    ratio = 0.7
    reduced = [g * ratio + torch.diag(torch.diagonal(g)) * (1 - ratio) for g in grams]
    weights = [base + tau for tau in taus]  # FusionBench's rule on whole weights: (Σ G̃)⁻¹ Σ G̃ Wᵀ, transposed back
    expected = (torch.inverse(sum(reduced)) @ sum(g @ w.T for g, w in zip(reduced, weights))).T
    torch.testing.assert_close(base + lsq.regmean(taus, grams, ratio), expected)
    conv = lsq.regmean(taus.transpose(1, 2), grams, ratio, transposed=False)  # Conv1D stores the same weight [in, out]
    torch.testing.assert_close(conv, lsq.regmean(taus, grams, ratio).T)


def test_regmean_with_plain_inputs_is_the_least_squares_merge():
    """ratio 1: W* minimises Σ_t ‖X_t W − X_t W_t‖² over the tasks' own inputs (RegMean's defining problem)."""
    taus = random_taus((5, 4))
    xs = [random_taus((30, 4), seed=10 + t, tasks=1)[0] for t in range(3)]
    grams = torch.stack([x.T @ x for x in xs])
    stacked_x = torch.cat(xs)
    stacked_y = torch.cat([x @ tau.T for x, tau in zip(xs, taus)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(lsq.regmean(taus, grams, 1.0), expected)
