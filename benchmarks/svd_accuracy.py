"""How accurate is randomized SVD on real task vectors? Top singular values, subspaces and the TSV-M merge.

For every 2-D spectral tensor of a suite's fine-tuned models (real fine-tunes: the `text` suite is the real
pretrained all-MiniLM-L6-v2 fine-tuned on five tasks; see docs/BENCHMARKS.md), τ_t = θ_t − θ_0 is factorized
exactly and with the randomized range finder at several (oversample, power_iters) settings, keeping the k leading
components TSV-M keeps (⌊r/T⌋) and a fixed k. Printed per setting, over all tensors and tasks:

- top-σ error: max and median of |σ̂_i − σ_i| / σ_i over the kept i,
- subspace: mean over tensors of ‖Û_kᵀ U_k‖²_F / k (1 = the same leading left subspace),
- rank-k task vector (what TA-SVD, CART and AdaRank-TA use): median ‖Û diag(σ̂) V̂ − U diag(σ) V‖_F / ‖U diag(σ) V‖_F,
- TSV-M merge: median ‖Δ̂ − Δ‖_F / ‖Δ‖_F of the whitened TSV-M delta per tensor,
- time of the factorizations relative to the exact SVD (one torch thread).

    .venv/bin/python benchmarks/svd_accuracy.py --models .bench/suites/text/models [--k 16] [--max-tensors 24]

Any folder with base/ and one folder per fine-tuned model works (e.g. .bench/scale/vitl for the synthetic ViT-L).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.methods import spectral as sp
from rankmerge.workers.methods.svd import SvdOptions, top_svd
from rankmerge.workers.plan import build_plan
from rankmerge.workers.roles import Role
from rankmerge.workers.static_merge import load_inputs

LOG = logging.getLogger("svd_accuracy")
SETTINGS = [SvdOptions("randomized", p, q) for p, q in ((0, 0), (10, 0), (10, 1), (10, 2), (20, 2), (10, 4))]


def spectral_inputs(root: Path, max_tensors: int, stack: ExitStack):
    """Yield (key, stacked fp32 task vectors) for up to max_tensors 2-D spectral tensors spread over the model."""
    base = stack.enter_context(ModelCheckpoint(root / "base", "base"))
    tasks = [stack.enter_context(ModelCheckpoint(d, d.name)) for d in sorted(root.iterdir())
             if d.is_dir() and d.name != "base" and (d / "config.json").exists()]
    plan = build_plan(base, {t.name: t for t in tasks})
    entries = [e for e in plan.merged if e.role is Role.SPECTRAL]
    step = max(1, len(entries) // max_tensors)
    for entry in entries[::step][:max_tensors]:
        yield entry.key, load_inputs(entry, base, tasks).taus


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compare(taus: torch.Tensor, k: int, options: SvdOptions, with_merge: bool) -> dict[str, float]:
    """Errors of one setting on one tensor against the exact factorization (and of the TSV-M merge it feeds)."""
    errors, overlaps, recon, exact_s, approx_s = [], [], [], 0.0, 0.0
    for tau in taus:
        (u, s, vh), t_exact = timed(lambda: top_svd(tau, k))
        (ua, sa, vha), t_approx = timed(lambda: top_svd(tau, k, options))
        exact_s, approx_s = exact_s + t_exact, approx_s + t_approx
        errors.extend(((sa - s).abs() / s.clamp(min=1e-30)).tolist())
        overlaps.append(float(torch.linalg.matrix_norm(ua.T @ u) ** 2) / s.numel())
        low_rank = (u * s) @ vh
        recon.append(float(torch.linalg.norm((ua * sa) @ vha - low_rank) / torch.linalg.norm(low_rank).clamp(min=1e-30)))
    merge_err = float("nan")
    if with_merge:
        exact_m = sp.tsv_factorization(taus).materialize()
        approx_m = sp.tsv_factorization(taus, options).materialize()
        merge_err = float(torch.linalg.norm(approx_m - exact_m) / torch.linalg.norm(exact_m).clamp(min=1e-30))
    return {"sigma_max": max(errors), "sigma_median": statistics.median(errors), "subspace": statistics.mean(overlaps),
            "low_rank": statistics.median(recon),
            "merge": merge_err, "exact_s": exact_s, "approx_s": approx_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="folder with base/ and one folder per fine-tuned model")
    parser.add_argument("--k", type=int, default=16, help="fixed number of leading components compared (besides ⌊r/T⌋)")
    parser.add_argument("--max-tensors", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    with ExitStack() as stack:
        for key, taus in spectral_inputs(args.models, args.max_tensors, stack):
            rank = min(taus.shape[1:])
            LOG.info("%s %s", key, list(taus.shape))
            for label, k in ((f"k={args.k}", args.k), ("k=r/T", rank // taus.shape[0])):
                for options in SETTINGS:
                    rows.setdefault((label, f"p={options.oversample} q={options.power_iters}"), []).append(compare(taus, k, options, label == "k=r/T"))
    print(f"{'k':<8} {'setting':<12} {'top-σ max rel err':>18} {'median':>10} {'subspace':>9} {'rank-k τ err':>13} {'TSV-M Δ rel err':>16} {'time vs exact':>14}")
    for (label, setting), results in rows.items():
        ratio = sum(r["approx_s"] for r in results) / sum(r["exact_s"] for r in results)
        print(f"{label:<8} {setting:<12} {max(r['sigma_max'] for r in results):>18.2e} "
              f"{statistics.median(r['sigma_median'] for r in results):>10.2e} {statistics.mean(r['subspace'] for r in results):>9.4f} "
              f"{statistics.median(r['low_rank'] for r in results):>13.2e} "
              f"{statistics.median(r['merge'] for r in results):>16.2e} {ratio:>14.2f}")


if __name__ == "__main__":
    main()
