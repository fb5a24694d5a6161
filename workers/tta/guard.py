"""The label-free guard of an adaptive merge: a held-out unlabeled slice per task, scored at step 0 and at every
checkpoint by agreement with the task's own model and by the spread of the predicted classes, so the job keeps the
best state it reached, and says loudly when adaptation ended worse than where it started. No label is ever read.

- agreement: fraction of held-out rows (tokens, for causal LMs) where the merged model's argmax equals the task
  model's (the teacher cache, workers/tta/teachers.py). The score of a state is the mean over tasks.
- spread: entropy of the mean predicted distribution over log(classes). A collapse onto one class drives it to 0;
  a state whose spread for any task falls below COLLAPSE × its step-0 spread is never selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rankmerge.workers.methods.elementwise import stable_seed
from rankmerge.workers.tta.objectives import TEACHER_INDEX, TEACHER_LOGITS, marginal_entropy

COLLAPSE = 0.5


def holdout_split(rows: int, fraction: float, max_rows: int, seed: int, task: str) -> tuple[Tensor, Tensor]:
    """(held-out rows, adaptation rows) of one task, seeded by task; nothing is held out of fewer than 10 rows."""
    count = min(int(round(rows * fraction)), max_rows) if rows >= 10 else 0
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(stable_seed(seed, task, "holdout")))
    return order[:count].sort().values, order[count:].sort().values


def reference_labels(targets: dict[str, Tensor]) -> Tensor:
    """The task model's argmax per row (per token for causal LMs: its top-1 vocabulary id)."""
    if TEACHER_INDEX in targets:
        return targets[TEACHER_INDEX][..., 0].long()
    return targets[TEACHER_LOGITS].argmax(-1)


@dataclass
class GuardTally:
    """Streaming counts of one task's held-out scoring (batches of any size, sequences or not)."""

    agree: float = 0.0
    count: float = 0.0
    probs: Tensor | None = None

    @torch.no_grad()
    def add(self, logits: Tensor, reference: Tensor, valid: Tensor | None = None) -> None:
        reference = reference.to(logits.device)
        mask = torch.ones(reference.shape, dtype=torch.bool, device=logits.device) if valid is None or logits.dim() == 2 else valid.bool()
        self.agree += float(((logits.argmax(-1) == reference) & mask).sum())
        self.count += float(mask.sum())
        probs = torch.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])[mask.reshape(-1)].sum(0)
        self.probs = probs if self.probs is None else self.probs + probs

    def signals(self) -> dict[str, float]:
        classes = self.probs.numel() if self.probs is not None else 1
        spread = 1.0 if classes < 2 else float(marginal_entropy(self.probs, torch.tensor(self.count)) / torch.log(torch.tensor(float(classes))))
        return {"agreement": round(self.agree / max(self.count, 1.0), 6), "spread": round(spread, 6)}


@dataclass
class GuardTrack:
    """The guard's curve and the best state's step; everything here is checkpointed (meta) so a resume keeps it."""

    curve: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None

    @staticmethod
    def score(point: dict[str, Any]) -> float:
        return sum(t["agreement"] for t in point["tasks"]) / max(len(point["tasks"]), 1)

    def collapsed(self, point: dict[str, Any]) -> bool:
        start = self.curve[0]["tasks"] if self.curve else point["tasks"]
        return any(now["spread"] < COLLAPSE * then["spread"] for now, then in zip(point["tasks"], start))

    def record(self, step: int, tasks: list[dict[str, float]]) -> bool:
        """Add a point; True when it becomes the best state (strictly higher score, not collapsed)."""
        point = {"step": step, "tasks": tasks}
        point["score"] = round(self.score(point), 6)
        point["collapsed"] = self.collapsed(point)
        self.curve = [p for p in self.curve if p["step"] < step] + [point]
        best = self.best_point()
        if not point["collapsed"] and (best is None or point["score"] > best["score"]):
            self.best_step = step
            return True
        return False

    def best_point(self) -> dict[str, Any] | None:
        return next((p for p in self.curve if p["step"] == self.best_step), None)

    def degraded(self) -> str | None:
        """Why the last state is worse than step 0 by the guard, or None."""
        if len(self.curve) < 2:
            return None
        start, last = self.curve[0], self.curve[-1]
        if last["collapsed"]:
            return f"the predictions collapsed at step {last['step']} (class spread fell below {COLLAPSE} of step 0's)"
        if last["score"] < start["score"]:
            return (f"agreement with the task models on held-out inputs fell from {start['score']:.3f} at step 0 "
                    f"to {last['score']:.3f} at step {last['step']}")
        return None

    def state(self) -> dict[str, Any]:
        return {"curve": self.curve, "best_step": self.best_step}

    def load(self, state: dict[str, Any], step: int) -> None:
        self.curve = [p for p in state.get("curve", []) if p["step"] <= step]
        self.best_step = state.get("best_step")
