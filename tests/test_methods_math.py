"""Every merge method against its formula (docs/METHODS.md) on small random tensors, plus the project invariants."""

import math

import pytest
import torch

from rankmerge.workers.methods import elementwise as ew
from rankmerge.workers.methods import spectral as sp
from rankmerge.workers.methods.registry import MergeContext, TensorInputs, make_method
from rankmerge.workers.methods.streaming_stats import StreamingKthSmallest
from rankmerge.workers.roles import Role

T = 3


@pytest.fixture
def taus():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(T, 12, 8, generator=gen)


def run(method, taus, role=Role.SPECTRAL, base=None, **params):
    """Merge one tensor through the registry (stat passes included) and return the delta."""
    base = torch.zeros(taus.shape[1:]) if base is None else base
    m = make_method(method, params, MergeContext(tuple(f"t{i}" for i in range(len(taus))), taus[0].numel()))
    inputs = TensorInputs("layers.0.w", role, base, taus)
    for p in m.stat_passes():
        p.observe(inputs)
        p.finish()
    return m.merge(TensorInputs("layers.0.w", role, base, taus.clone()))[0]


def test_weight_average_and_task_arithmetic(taus):
    torch.testing.assert_close(run("weight_average", taus), taus.mean(0))
    torch.testing.assert_close(run("task_arithmetic", taus, **{"lambda": 0.7}), 0.7 * taus.sum(0))


def test_invariant_ta_with_one_over_t_is_weight_average(taus):
    torch.testing.assert_close(run("task_arithmetic", taus, **{"lambda": 1 / T}), run("weight_average", taus))


def _ties_by_hand(taus, k, lam, mode):
    """Element-by-element TIES, written independently of the vectorised code."""
    flat = taus.reshape(T, -1)
    d = flat.shape[1]
    trimmed = torch.zeros_like(flat)
    for t in range(T):
        order = sorted(flat[t].abs().tolist())
        threshold = order[d - int(d * k) - 1]
        trimmed[t] = torch.where(flat[t].abs() >= threshold, flat[t], 0.0)
    signs = [math.copysign(1, s) if s != 0 else 0 for s in trimmed.sum(0).tolist()]
    majority = math.copysign(1, sum(signs)) if sum(signs) != 0 else 0
    out = torch.zeros(d)
    for j in range(d):
        g = signs[j] if signs[j] != 0 else majority
        vals = [float(trimmed[t, j]) for t in range(T) if (trimmed[t, j] > 0 if g > 0 else trimmed[t, j] < 0)]
        out[j] = (sum(vals) / max(1, len(vals))) if mode == "mean" else sum(vals)
    return lam * out.reshape(taus.shape[1:])


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_ties_matches_formula(taus, mode):
    expected = _ties_by_hand(taus, 0.3, 0.5, mode)
    torch.testing.assert_close(run("ties", taus, k=0.3, merge=mode, **{"lambda": 0.5}), expected)
    torch.testing.assert_close(ew.ties(taus.reshape(T, -1), 0.3, 0.5, mode).reshape(taus.shape[1:]), expected)


def test_ties_keeps_top_k_fraction_per_task(taus):
    thresholds = torch.stack([ew.kth_smallest_threshold(t, 0.25) for t in taus])
    kept = (ew.trim_(taus.clone(), thresholds) != 0).reshape(T, -1).float().mean(1)
    assert torch.allclose(kept, torch.full((T,), 0.25), atol=1 / taus[0].numel())


def test_dare_is_seeded_unbiased_and_rescaled():
    tau = torch.ones(200, 200)
    a = ew.dare_drop(tau, 0.3, seed=7)
    assert torch.equal(a, ew.dare_drop(tau, 0.3, seed=7))
    assert not torch.equal(a, ew.dare_drop(tau, 0.3, seed=8))
    values = a.unique()
    assert len(values) == 2 and float(values[0]) == 0.0 and float(values[1]) == pytest.approx(1 / 0.7)
    assert abs(float((a == 0).float().mean()) - 0.3) < 0.01
    assert abs(float(a.mean()) - 1.0) < 0.02
    torch.testing.assert_close(ew.dare_drop(tau, 0.0, seed=1), tau)


def test_dare_method_is_ta_of_dropped(taus):
    names = ("t0", "t1", "t2")
    dropped = torch.stack([ew.dare_drop(t, 0.4, ew.stable_seed(3, n, "layers.0.w")) for n, t in zip(names, taus)])
    torch.testing.assert_close(run("dare", taus, p=0.4, seed=3, **{"lambda": 0.3}), 0.3 * dropped.sum(0))


def test_consensus_matches_formula(taus):
    mtl = taus.sum(0)
    masks = torch.stack([taus[t].abs() > 0.4 * (mtl - taus[t]).abs() for t in range(T)])
    expected = 0.5 * mtl * (masks.sum(0) >= 2)
    torch.testing.assert_close(run("consensus", taus, alpha=0.5, tall_lambda=0.4, k=2), expected)
    per_task = run("consensus", taus, alpha=0.5, tall_lambda=[0.4, 0.4, 0.4], k=2)
    torch.testing.assert_close(per_task, expected)


def test_drop_rates_monotone_in_concentration():
    conc = torch.tensor([0.05, 0.10, 0.20, 0.40, 0.80])
    rates = ew.drop_rates(conc, p_mean=0.5, beta=0.1, p_min=0.1, p_max=0.9)
    assert all(a > b for a, b in zip(rates, rates[1:])), "more concentrated tensors must be dropped less"
    assert float(rates[2]) == pytest.approx(0.5)  # the median tensor gets the target rate
    assert float(ew.drop_rates(conc, 0.5, 1.0, 0.3, 0.7).min()) >= 0.3 - 1e-6


def test_concentration_orders_sparse_above_dense():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(T, 100, 100, generator=gen)
    sparse = dense * (torch.rand(T, 100, 100, generator=gen) < 0.01)
    assert ew.concentration(sparse) > ew.concentration(dense)


def test_tadrop_drops_by_magnitude_at_its_rate(taus):
    delta = run("tadrop", taus, p=0.5, host="ta", **{"lambda": 1.0})
    expected = ew.magnitude_drop(taus, 0.5).sum(0)  # a single tensor is its own median: rate = p̄
    torch.testing.assert_close(delta, expected)


def test_star_preserves_nuclear_norm_and_truncates(taus):
    trunc, keep = sp.star_truncate(taus[0], 40.0)
    s = torch.linalg.svdvals(taus[0])
    expected_keep = int((torch.cumsum(s, 0) < 0.4 * s.sum()).sum()) + 1
    assert keep == expected_keep
    assert torch.linalg.matrix_rank(trunc) == keep
    assert float(torch.linalg.svdvals(trunc).sum()) == pytest.approx(float(s.sum()), rel=1e-5)
    full, keep_all = sp.star_truncate(taus[0], 100.0)
    torch.testing.assert_close(full, taus[0], atol=1e-5, rtol=1e-4)
    merged = run("star", taus, eta=40.0)
    torch.testing.assert_close(merged, torch.stack([sp.star_truncate(t, 40.0)[0] for t in taus]).mean(0))


def _svd_k(a, k):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def test_cart_matches_formula(taus):
    mean = taus.mean(0)
    k = max(1, int(0.25 * 8))
    expected = mean + 1.5 * sum(_svd_k(t - mean, k) for t in taus)
    torch.testing.assert_close(run("cart", taus, rho=0.25, **{"lambda": 1.5}), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run("cart", taus, role=Role.ELEMENTWISE, rho=0.25), mean)


def test_ta_svd_matches_formula_and_full_rank_is_ta(taus):
    expected = 0.3 * sum(_svd_k(t, 2) for t in taus)
    torch.testing.assert_close(run("ta_svd", taus, rho=0.25, **{"lambda": 0.3}), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run("ta_svd", taus, rho=1.0, **{"lambda": 0.3}), 0.3 * taus.sum(0), atol=1e-5, rtol=1e-4)


def test_invariant_cart_rho_one_is_weight_average(taus):
    torch.testing.assert_close(run("cart", taus, rho=1.0, **{"lambda": 2.0}), taus.mean(0), atol=1e-5, rtol=1e-4)


def test_tsv_m_whitened_factors_and_formula(taus):
    fac = sp.tsv_factorization(taus)
    k = 8 // T
    assert fac.U.shape == (12, T * k) and fac.Vh.shape == (T * k, 8)
    torch.testing.assert_close(fac.U.T @ fac.U, torch.eye(T * k), atol=1e-5, rtol=0)
    torch.testing.assert_close(fac.Vh @ fac.Vh.T, torch.eye(T * k), atol=1e-5, rtol=0)
    # formula: polar factors of the concatenated top-k blocks
    svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    u_hat = torch.cat([u[:, :k] for u, _, _ in svds], 1)
    p, _, q = torch.linalg.svd(u_hat, full_matrices=False)
    torch.testing.assert_close(fac.U, p @ q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run("tsv_m", taus, alpha=0.7), 0.7 * fac.materialize(), atol=1e-5, rtol=1e-4)


def test_tsv_m_equals_sum_of_truncations_for_orthogonal_tasks():
    """When task subspaces are already orthogonal, whitening changes nothing: TSV-M = Σ_t SVD_k(τ_t)."""
    q1, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1)))
    q2, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(2)))
    taus = torch.stack([q1[:, 3 * t : 3 * t + 3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ q2[:, 3 * t : 3 * t + 3].T for t in range(3)])
    expected = sum(_svd_k(t, 3) for t in taus)
    torch.testing.assert_close(sp.tsv_factorization(taus).materialize(), expected, atol=1e-5, rtol=1e-4)


def test_iso_c_flat_spectrum_same_subspace(taus):
    delta = run("iso_c", taus, alpha=1.0)
    s = torch.linalg.svdvals(taus.sum(0))
    torch.testing.assert_close(torch.linalg.svdvals(delta), torch.full_like(s, float(s.mean())), atol=1e-4, rtol=1e-4)
    u, _, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    torch.testing.assert_close(delta, float(s.mean()) * u @ vh, atol=1e-5, rtol=1e-4)


def test_iso_cts_structure(taus):
    fac = sp.iso_cts_factorization(taus, 0.5)
    k_common, per_task = sp.iso_cts_split(8, T, 0.5)
    assert (k_common, per_task) == (8 - round(4 / 3) * 3, round(4 / 3))
    assert int((fac.task_of_component == sp.SHARED).sum()) == k_common
    torch.testing.assert_close(fac.U.T @ fac.U, torch.eye(8), atol=1e-5, rtol=0)
    sv = torch.linalg.svdvals(fac.materialize())
    torch.testing.assert_close(sv, torch.full_like(sv, float(fac.s[0])), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,params", [("tsv_m", {"alpha": 1.3}), ("iso_c", {"alpha": 0.9}), ("iso_cts", {"alpha": 1.1})])
def test_invariant_static_spectral_is_materialized_factorization(taus, method, params):
    builders = {"tsv_m": sp.tsv_factorization, "iso_c": sp.iso_c_factorization, "iso_cts": sp.iso_cts_factorization}
    fac = builders[method](taus)
    torch.testing.assert_close(run(method, taus, **params), fac.materialize(scale=params["alpha"]), atol=1e-5, rtol=1e-4)


def test_factorization_with_all_components_is_task_arithmetic(taus):
    fac = sp.per_task_factorization(taus)
    torch.testing.assert_close(fac.materialize(scale=0.3), 0.3 * taus.sum(0), atol=1e-5, rtol=1e-4)
    assert fac.kept_per_task(T) == [8, 8, 8]


def test_thin_svd_of_wide_matrix_reconstructs():
    a = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    u, s, vh = sp.thin_svd(a)
    assert u.shape == (5, 5) and vh.shape == (5, 40)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.999, 1.0])
def test_streaming_kth_is_exact_over_chunks(keep):
    gen = torch.Generator().manual_seed(5)
    chunks = [torch.randn(n, generator=gen).abs() for n in (1000, 7, 3000)]
    chunks.append(torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5]))  # zeros and ties
    allv = torch.cat(chunks)
    kth = StreamingKthSmallest([ew.trim_rank(allv.numel(), keep)])
    for c in chunks:
        kth.observe_high(0, c)
    kth.finish_high()
    for c in chunks:
        kth.observe_low(0, c)
    assert float(kth.thresholds()[0]) == float(ew.kth_smallest_threshold(allv, keep))


def test_ties_tensor_scope_trims_each_tensor_to_its_own_top_k():
    """scope=tensor (mergekit's TIES) keeps k of every tensor; scope=model keeps k of the whole model."""
    gen = torch.Generator().manual_seed(3)
    small, large = torch.randn(T, 10, 10, generator=gen) * 0.01, torch.randn(T, 10, 10, generator=gen)
    ctx = MergeContext(tuple(f"t{i}" for i in range(T)), small[0].numel() + large[0].numel())
    kept = {}
    for scope in ("model", "tensor"):
        m = make_method("ties", {"k": 0.2, "scope": scope}, ctx)
        tensors = [TensorInputs("small", Role.SPECTRAL, torch.zeros(10, 10), small), TensorInputs("large", Role.SPECTRAL, torch.zeros(10, 10), large)]
        for p in m.stat_passes():
            for inputs in tensors:
                p.observe(inputs)
            p.finish()
        kept[scope] = [m.merge(TensorInputs(i.key, i.role, i.base, i.taus.clone()))[1]["kept_fraction"] for i in tensors]
    assert kept["tensor"] == [0.21, 0.21]  # the reference keeps |τ| >= the (d − ⌊k·d⌋)-th smallest: 21 of 100
    assert kept["model"][0] < 0.05 and kept["model"][1] > 0.35  # the global threshold sits in the large tensor's range
    one = torch.randn(T, 12, 8, generator=gen)
    torch.testing.assert_close(run("ties", one, k=0.3, scope="tensor"), _ties_by_hand(one, 0.3, 0.3, "sum"))


@pytest.mark.parametrize("method", ["ta_svd", "cart", "tsv_m"])
def test_max_rank_caps_components_per_task(taus, method):
    m = make_method(method, {"max_rank": 2, "rho": 0.9} if method != "tsv_m" else {"max_rank": 1}, MergeContext(("a", "b", "c"), taus[0].numel()))
    _, info = m.merge(TensorInputs("w", Role.SPECTRAL, torch.zeros(12, 8), taus.clone()))
    assert info.get("rank_per_task", info.get("components")) == (2 if method != "tsv_m" else 3)


# ---- mergekit and FusionBench parity methods: each against its formula, computed independently in float64 ---------
from rankmerge.workers.errors import MergeInputError  # noqa: E402
from rankmerge.workers.methods import interpolate as ip  # noqa: E402
from rankmerge.workers.methods import sparsify as spz  # noqa: E402


def _slerp64(t, a, b):
    """Textbook slerp of the flattened tensors, lerp when nearly colinear (mergekit's threshold 0.9995)."""
    a, b = a.double(), b.double()
    cos = float((a / a.norm()).flatten() @ (b / b.norm()).flatten())
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_slerp_matches_formula(taus):
    base = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    one = taus[:1]
    for t in (0.0, 0.3, 1.0):
        expected = (_slerp64(t, base, base + one[0]) - base.double()).float()
        torch.testing.assert_close(run("slerp", one, base=base, t=t), expected, atol=1e-5, rtol=1e-5)
    colinear = base[None] * 1.0  # θ1 = 2 θ0: the lerp fallback
    torch.testing.assert_close(run("slerp", colinear, base=base, t=0.25), 0.25 * base)
    with pytest.raises(MergeInputError, match="exactly 1"):
        run("slerp", taus, base=base)


def _rows_slerp64(t, a, b):
    """Slerp of every row (last dim) separately."""
    return torch.stack([_slerp64_exact(t, x, y) for x, y in zip(a.double(), b.double())])


def _slerp64_exact(t, a, b):
    cos = float(a @ b / (a.norm() * b.norm()))
    th = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_nuslerp_matches_formula(taus):
    two, w = taus[:2], {"t0": 1.0, "t1": 3.0}
    whole = _slerp64_exact(0.75, two[0].double().flatten(), two[1].double().flatten()).reshape(12, 8)
    torch.testing.assert_close(run("nuslerp", two, weight=w), whole.float(), atol=1e-5, rtol=1e-5)
    rows = _rows_slerp64(0.75, two[0], two[1])
    torch.testing.assert_close(run("nuslerp", two, weight=w, nuslerp_flatten=False), rows.float(), atol=1e-5, rtol=1e-5)
    cols = _rows_slerp64(0.75, two[0].T, two[1].T).T
    got = run("nuslerp", two, weight=w, nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(got, cols.float(), atol=1e-5, rtol=1e-5)
    base = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    models = _slerp64_exact(0.5, (base + two[0]).double().flatten(), (base + two[1]).double().flatten()).reshape(12, 8)
    torch.testing.assert_close(run("nuslerp", two, base=base, use_base=False), (models - base.double()).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeInputError, match="exactly 2"):
        run("nuslerp", taus)


def test_karcher_is_the_spherical_mean_times_mean_norm(taus):
    base = torch.zeros(12, 8)
    two = torch.stack([taus[0], 2.5 * taus[1]])  # two points: the mean direction is the great-circle midpoint
    a, b = two.double().reshape(2, -1)
    mid = _slerp64_exact(0.5, a / a.norm(), b / b.norm())
    expected = (a.norm() + b.norm()) / 2 * mid / mid.norm()
    torch.testing.assert_close(run("karcher", two, base=base, max_iter=50, tol=1e-9), expected.reshape(12, 8).float(), atol=1e-5, rtol=1e-4)
    merged = run("karcher", taus, base=base, max_iter=100, tol=1e-9).double().flatten()
    units = [t / t.norm() for t in taus.double().reshape(T, -1)]
    assert float(merged.norm()) == pytest.approx(float(sum(t.norm() for t in taus.double().reshape(T, -1)) / T), rel=1e-5)
    u = merged / merged.norm()  # first-order condition of the Karcher mean: the log maps sum to zero
    logs = sum(math.acos(float(u @ x)) / math.sin(math.acos(float(u @ x))) * (x - float(u @ x) * u) for x in units)
    assert float(logs.norm()) < 1e-4
    shifted = run("karcher", taus, base=torch.ones(12, 8), include_base=True)
    assert shifted.shape == (12, 8) and torch.isfinite(shifted).all()


def test_karcher_keeps_its_digits_for_fine_tunes_of_one_base():
    """Fine-tunes point in nearly one direction (angles ~1e-3 rad), where an arccos of float32 cosines loses the
    update entirely: float32 must land within 0.1% of the float64 result on the update itself, not on the weights."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 256, generator=g)
    taus = 1e-3 * torch.randn(T, 512, 256, generator=g)
    got = run("karcher", taus, base=base).double()
    ref = run("karcher", taus.double(), base=base.double())
    assert float((got - ref).norm() / ref.norm()) < 1e-3


def test_model_stock_matches_formula(taus):
    flat = taus.double().reshape(T, -1)
    cos = sum(float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())) for i in range(T) for j in range(i + 1, T)) / 3
    t = T * cos / (1 + (T - 1) * cos)
    torch.testing.assert_close(run("model_stock", taus), (t * taus.double().mean(0)).float(), atol=1e-6, rtol=1e-5)
    rows = taus.double()
    expected = torch.zeros(12, 8, dtype=torch.float64)
    for r in range(12):
        c = sum(float(rows[i, r] @ rows[j, r] / (rows[i, r].norm() * rows[j, r].norm())) for i in range(T) for j in range(i + 1, T)) / 3
        expected[r] = T * c / (1 + (T - 1) * c) * rows[:, r].mean(0)
    torch.testing.assert_close(run("model_stock", taus, filter_wise=True), expected.float(), atol=1e-6, rtol=1e-5)
    with pytest.raises(MergeInputError, match="at least 2"):
        run("model_stock", taus[:1])


def _breadcrumbs64(tau, density, gamma):
    """Keep the entries ranked ⌊γn⌋ … ⌊γn⌋+⌊dn⌋−1 by decreasing magnitude."""
    n = tau.numel()
    order = sorted(range(n), key=lambda i: -abs(float(tau.flatten()[i])))
    top = int(gamma * n)
    keep = order[top:top + int(density * n)]
    out = torch.zeros(n, dtype=torch.float64)
    out[keep] = tau.double().flatten()[keep]
    return out.reshape(tau.shape)


def _consensus64(kept, w, normalize):
    """Per entry: the weighted values agreeing with the sign of their sum (0 → +), summed, / their weights."""
    flat = kept.reshape(len(kept), -1)
    out = torch.zeros(flat.shape[1], dtype=torch.float64)
    for j in range(flat.shape[1]):
        vals = [w[t] * float(flat[t, j]) for t in range(len(kept))]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [t for t, v in enumerate(vals) if v * sign > 0]
        total = sum(vals[t] for t in agree)
        out[j] = total / (sum(w[t] for t in agree) or 1.0) if normalize else total
    return out.reshape(kept.shape[1:])


def test_breadcrumbs_matches_formula():
    taus = torch.randn(T, 20, 10, generator=torch.Generator().manual_seed(4))  # 200 entries: ⌊0.02·200⌋ = 4 outliers
    w = [0.5, 1.0, 2.0]
    kept = torch.stack([_breadcrumbs64(t, 0.3, 0.02) for t in taus])
    linear = sum(wi * k for wi, k in zip(w, kept))
    weights = dict(zip(("t0", "t1", "t2"), w))
    got = run("breadcrumbs", taus, weight=weights, density=0.3, gamma=0.02, **{"lambda": 0.8})
    torch.testing.assert_close(got, (0.8 * linear).float(), atol=1e-6, rtol=1e-5)
    got = run("breadcrumbs", taus, weight=weights, density=0.3, gamma=0.02, normalize=True)
    torch.testing.assert_close(got, (linear / sum(w)).float(), atol=1e-6, rtol=1e-5)
    got = run("breadcrumbs_ties", taus, weight=weights, density=0.3, gamma=0.02, normalize=True)
    torch.testing.assert_close(got, _consensus64(kept, w, True).float(), atol=1e-6, rtol=1e-5)
    rescaled = torch.stack([k * t.double().abs().sum() / k.abs().sum() for k, t in zip(kept, taus)])
    got = run("breadcrumbs", taus, density=0.3, gamma=0.02, rescale=True)
    torch.testing.assert_close(got, rescaled.sum(0).float(), atol=1e-5, rtol=1e-5)
    assert not spz.magnitude_outliers(taus[0], 0.3, 0.001).any()  # ⌊γn⌋ = 0: mergekit's empty slice


def test_della_keep_probabilities_and_seeded_drop():
    tau = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    expected = torch.tensor([[0.3, 0.7, 0.6, 0.4, 0.5]])  # ranks 0..4 of |τ| → 0.5 − 0.2 + rank/4 · 0.4
    torch.testing.assert_close(spz.della_keep_probabilities(tau, 0.5, 0.2), expected)
    big = torch.randn(4, 4000, generator=torch.Generator().manual_seed(5))
    dropped = spz.della_magprune(big, 0.5, 0.2, seed=9)
    assert torch.equal(dropped, spz.della_magprune(big, 0.5, 0.2, seed=9))
    assert not torch.equal(dropped, spz.della_magprune(big, 0.5, 0.2, seed=10))
    order = big.abs().argsort(1)
    small, large = [(dropped.gather(1, order[:, s]) != 0).double().mean() for s in (slice(0, 400), slice(3600, 4000))]
    assert abs(float(small) - 0.31) < 0.04 and abs(float(large) - 0.69) < 0.04


def test_della_is_rescaled_consensus_of_its_drop(taus):
    names = ("t0", "t1", "t2")
    drops = [spz.della_magprune(t, 0.4, 0.1, ew.stable_seed(3, n, "layers.0.w")) for n, t in zip(names, taus)]
    kept = torch.stack([d.double() * t.double().abs().sum() / d.double().abs().sum() for d, t in zip(drops, taus)])
    got = run("della", taus, density=0.4, epsilon=0.1, seed=3)
    torch.testing.assert_close(got, _consensus64(kept, [1.0] * T, True).float(), atol=1e-5, rtol=1e-5)
    got = run("della_linear", taus, density=0.4, epsilon=0.1, seed=3, **{"lambda": 0.5})
    torch.testing.assert_close(got, (0.5 * kept.sum(0)).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeInputError, match="outside"):
        run("della", taus, density=0.9, epsilon=0.15)


def test_sce_matches_formula(taus):
    x = taus.double().reshape(T, -1)
    var = x.var(0, unbiased=False)
    keep = set(var.argsort(descending=True)[: int(x.shape[1] * 0.5)].tolist())
    sel = torch.stack([torch.tensor([float(v) if j in keep else 0.0 for j, v in enumerate(row)]) for row in x]).double()
    energy = [float((row ** 2).mean()) for row in sel]
    w = [e / sum(energy) for e in energy]
    out = torch.zeros(x.shape[1], dtype=torch.float64)
    for j in range(x.shape[1]):
        sign = 1.0 if float(sel[:, j].sum()) >= 0 else -1.0
        agree = [t for t in range(T) if float(sel[t, j]) * sign > 0]
        out[j] = sum(w[t] * float(sel[t, j]) for t in agree) / max(sum(w[t] for t in agree), 1e-6)
    torch.testing.assert_close(run("sce", taus, select_topk=0.5), out.reshape(12, 8).float(), atol=1e-6, rtol=1e-5)


def test_magmax_matches_formula_later_task_wins_ties(taus):
    x = taus.double().reshape(T, -1)
    expected = torch.tensor([max((float(x[t, j]) for t in range(T)), key=abs) for j in range(x.shape[1])])
    torch.testing.assert_close(run("magmax", taus, scaling_factor=0.7), (0.7 * expected).reshape(12, 8).float())
    tie = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])
    assert spz.magmax(tie).tolist() == [-1.0, 2.0]


@pytest.mark.parametrize("method,params,message", [
    ("slerp", {"t": 1.5}, "'t'"),
    ("breadcrumbs", {"gamma": -0.1}, "gamma"),
    ("della", {"epsilon": 0.7}, "epsilon"),
    ("sce", {"select_topk": 2}, "select_topk"),
    ("karcher", {"max_iter": 0}, "max_iter"),
    ("magmax", {"lambda": 1.0}, "unknown parameter"),
])
def test_parity_methods_refuse_bad_parameters_in_one_line(method, params, message):
    with pytest.raises(MergeInputError, match=message) as err:
        make_method(method, params, MergeContext(("a",), 10))
    assert "\n" not in str(err.value)
