"""Build an AdaptiveMerger from validated method parameters (used whole by the local executor and per column subset by
each shard): the parameters give the method the state starts from, the state layout and the optimizer options."""

from __future__ import annotations

import torch

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.methods.registry import MergeContext
from rankmerge.workers.plan import MergePlan
from rankmerge.workers.roles import Role, is_embedding
from rankmerge.workers.tta.engine import AdaptiveMerger
from rankmerge.workers.tta.params import AdaptiveParams
from rankmerge.workers.tta.state import build_state


def static_keys(params: AdaptiveParams, plan: MergePlan, output_kind: str) -> frozenset[str]:
    """Merged tensors kept at their static merge (λ0) rather than adapted: AdaRank's vocabulary tensors, per `vocab`.

    `output_kind`: what the task models output (workers/tta/adapters.py); causal LMs keep theirs static under `auto`.
    """
    setting = getattr(params, "vocab", "adapt")
    if setting == "adapt" or (setting == "auto" and output_kind != "causal_lm"):
        return frozenset()
    return frozenset(e.key for e in plan.merged if e.role is Role.ELEMENTWISE and is_embedding(plan.rules, e.key))


def make_merger(params: AdaptiveParams, lr: float, plan: MergePlan, base: ModelCheckpoint,
                tasks: list[Checkpoint], columns: list[int] | None = None,
                static: frozenset[str] = frozenset(), device: torch.device = torch.device("cpu")) -> AdaptiveMerger:
    """`static`: keys merged once at λ0 and not adapted (see static_keys); `device`: where the state lives."""
    method = params.method(MergeContext(tuple(t.name for t in tasks), plan.merged_numel))
    slots, lam = build_state(plan, base, tasks, method, params.state_options(columns, static), device)
    return AdaptiveMerger(slots, lam, params.adaptive_options(lr))
