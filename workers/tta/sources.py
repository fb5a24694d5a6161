"""Where a job's checkpoints are, as a small picklable value: the coordinator, every shard and every worker open the
same files themselves (headers first), so no weights travel through the driver."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.peft_adapter import open_model
from rankmerge.workers.plan import MergePlan, build_plan


@dataclass(frozen=True)
class Sources:
    base: Path
    models: dict[str, Path] = field(default_factory=dict)  # task name -> fine-tuned checkpoint, in task order
    allow_pickle: bool = False
    out_dtype: str | None = None
    heads: dict[str, Path] = field(default_factory=dict)  # task name -> its computed zero-shot head (workers/zero_shot.py)


def open_tasks(sources: Sources, base: ModelCheckpoint, stack: ExitStack) -> list[Checkpoint]:
    """The task checkpoints in order (closed with the stack): full checkpoints or PEFT adapters on `base`; a task with
    a zero-shot head is read with it."""
    from rankmerge.workers.zero_shot import ZeroShotTask

    tasks = [stack.enter_context(open_model(path, name, base, sources.allow_pickle)) for name, path in sources.models.items()]
    return [ZeroShotTask(ck, sources.heads[ck.name]) if ck.name in sources.heads else ck for ck in tasks]


def open_sources(sources: Sources, stack: ExitStack) -> tuple[ModelCheckpoint, list[Checkpoint], MergePlan]:
    """Open base and task checkpoints (closed with the stack) and build the merge plan from their headers."""
    base = stack.enter_context(ModelCheckpoint(sources.base, "base", sources.allow_pickle))
    tasks = open_tasks(sources, base, stack)
    out_dtype = getattr(torch, sources.out_dtype) if sources.out_dtype else None
    plan = build_plan(base, {t.name: t for t in tasks}, out_dtype)
    if not plan.merged:
        raise MergeInputError("the base has no floating-point tensors to merge", "check that --base is a model checkpoint")
    return base, tasks, plan
