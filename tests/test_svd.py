"""Truncated SVD: the randomized path against the exact one, and the methods built on it."""

import pytest
import torch

from rankmerge.workers.methods import spectral as sp
from rankmerge.workers.methods.svd import SvdOptions, randomized_svd, thin_svd, top_svd

RANDOMIZED = SvdOptions("randomized", oversample=8, power_iters=2)


def low_rank_plus_noise(m: int, n: int, rank: int = 12, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """A task-vector-like matrix: a decaying low-rank part plus dense noise."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0]
    s = 1.0 / (1.0 + torch.arange(rank, dtype=torch.float32))
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=gen) / (m * n) ** 0.25


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_randomized_top_values_and_subspace_match_exact(shape):
    a = low_rank_plus_noise(*shape)
    u, s, vh = thin_svd(a)
    ur, sr, vhr = randomized_svd(a, 6, oversample=8, power_iters=2)
    assert ur.shape == (shape[0], 6) and sr.shape == (6,) and vhr.shape == (6, shape[1])
    assert float(((sr - s[:6]).abs() / s[:6]).max()) < 1e-3
    # same leading subspaces: the projection of the exact vectors onto the randomized ones keeps their norm
    assert float(torch.linalg.matrix_norm(ur.T @ u[:, :6], "fro") ** 2) > 6 - 1e-2
    assert float(torch.linalg.matrix_norm(vhr @ vh[:6].T, "fro") ** 2) > 6 - 1e-2
    torch.testing.assert_close(ur.T @ ur, torch.eye(6), atol=1e-5, rtol=0)


def test_randomized_is_deterministic_and_seeded():
    a = low_rank_plus_noise(64, 48)
    first, again = randomized_svd(a, 5, seed=1), randomized_svd(a, 5, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], randomized_svd(a, 5, seed=2, power_iters=0)[0])


def test_top_svd_exact_is_the_leading_slice_and_randomized_falls_back_when_sketch_spans_all():
    a = low_rank_plus_noise(30, 20)
    u, s, vh = thin_svd(a)
    tu, ts, tvh = top_svd(a, 4)
    assert torch.equal(tu, u[:, :4]) and torch.equal(ts, s[:4]) and torch.equal(tvh, vh[:4])
    fallback = top_svd(a, 15, RANDOMIZED)  # 15 + 8 >= 20: exact
    assert torch.equal(fallback[1], s[:15])


def test_randomized_tsv_m_and_cart_merge_close_to_exact():
    """Close where the kept components are well separated from the rest (TSV-M keeps 16 of a rank-24 spectrum)."""
    taus = torch.stack([low_rank_plus_noise(80, 64, rank=24, seed=t) for t in range(4)])
    exact = sp.tsv_factorization(taus).materialize()
    approx = sp.tsv_factorization(taus, SvdOptions("randomized", 8, 4)).materialize()
    assert float(torch.linalg.norm(approx - exact) / torch.linalg.norm(exact)) < 1e-3
    cart_exact = sp.cart_factorization(taus, 0.1, cap=6).materialize()
    cart_approx = sp.cart_factorization(taus, 0.1, cap=6, svd=RANDOMIZED).materialize()
    assert float(torch.linalg.norm(cart_approx - cart_exact) / torch.linalg.norm(cart_exact)) < 1e-2
