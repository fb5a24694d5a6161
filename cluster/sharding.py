"""Split a plan's merged tensors into shards of balanced cost (pure: no I/O, no Ray)."""

from __future__ import annotations

from collections.abc import Callable

from rankmerge.workers.plan import MergePlan
from rankmerge.workers.roles import Role


def tensor_cost(shape: tuple[int, ...], factorized: bool, num_tasks: int) -> float:
    """SVD work ≈ T · m · n · min(m, n) for a factorized 2-D tensor; any other costs its T · numel reads."""
    numel = 1
    for d in shape:
        numel *= d
    if factorized and len(shape) == 2:
        return float(num_tasks) * numel * min(shape)
    return float(num_tasks) * numel


def shard_columns(plan: MergePlan, num_shards: int, factorized: Callable[[Role, tuple[int, ...]], bool]) -> list[list[int]]:
    """Longest-processing-time greedy: each tensor (a column of plan.merged) goes to the least-loaded shard.

    `factorized`: which tensors the method merges from SVDs (`MergeMethod.factorized`: with `spectral_keys: all_2d`
    the embeddings too, each then the costliest tensor of the model). Deterministic, so a rebuilt shard gets the same
    tensors. Never more shards than tensors.
    """
    num_tasks = len(plan.task_names)
    costs = [tensor_cost(e.shape, factorized(e.role, e.shape), num_tasks) for e in plan.merged]
    shards = max(1, min(num_shards, len(costs)))
    load = [0.0] * shards
    columns: list[list[int]] = [[] for _ in range(shards)]
    for k in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(shards), key=lambda s: (load[s], s))
        columns[target].append(k)
        load[target] += costs[k]
    return [sorted(c) for c in columns]
