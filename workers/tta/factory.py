"""Build an AdaptiveMerger from validated method parameters: the one place that maps AdaRank / AdaMerging settings
onto slots, λ and optimizer options (used whole by the local executor and per column subset by each shard)."""

from __future__ import annotations

import torch

from workers.checkpoint_reader import ModelCheckpoint
from workers.plan import MergePlan
from workers.roles import Role, is_embedding
from workers.tta.engine import AdaptiveMerger, AdaptiveOptions
from workers.tta.params import AdaMergingParams, AdaRankParams
from workers.tta.state import build_state


def static_keys(params: AdaRankParams | AdaMergingParams, plan: MergePlan, kind: str) -> frozenset[str]:
    """Merged tensors kept at their static merge (λ0) rather than adapted: AdaRank's vocabulary tensors, per `vocab`."""
    setting = getattr(params, "vocab", "adapt")
    if setting == "adapt" or (setting == "auto" and kind != "causal_lm"):
        return frozenset()
    return frozenset(e.key for e in plan.merged if e.role is Role.ELEMENTWISE and is_embedding(plan.rules, e.key))


def make_merger(params: AdaRankParams | AdaMergingParams, lr: float, plan: MergePlan, base: ModelCheckpoint,
                tasks: list[ModelCheckpoint], columns: list[int] | None = None,
                static: frozenset[str] = frozenset()) -> AdaptiveMerger:
    """`static`: keys merged once at λ0 and not adapted (see static_keys)."""
    if isinstance(params, AdaRankParams):
        slots, lam = build_state(plan, base, tasks, params.factorization, params.initial_lambda(), params.rho,
                                 params.common_fraction, params.mask_range, params.max_rank,
                                 getattr(torch, params.factor_dtype), columns=columns,
                                 svd=params.svd_options(), static=static)
        options = AdaptiveOptions(params.temperature, params.learn_lambda, params.learn_masks, None, lr, params.cache_masked)
    else:
        slots, lam = build_state(plan, base, tasks, "none", params.lambda_, columns=columns)
        options = AdaptiveOptions(learn_lambda=True, learn_masks=False, clamp=(0.0, 1.0) if params.clamp else None, lr=lr)
    return AdaptiveMerger(slots, lam, options)
