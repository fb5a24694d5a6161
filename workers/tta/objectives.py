"""Test-time objectives of the adaptive merges, and the label-free signals that guard them. Pure torch.

- `entropy` (the AdaRank/AdaMerging papers): Σ_t mean_b H(softmax(z_t,b)). It makes a weak merge confidently wrong:
  nothing stops the model from sharpening the wrong class.
- `infomax` (SHOT-style): Σ_t [mean_b H(p_t,b) − H(mean_b p_t,b)]; the second term punishes collapse onto one class.
- `distill` (the default): Σ_t mean_b KL(softmax(z*_t,b/T) ‖ softmax(z_t,b/T))·T², z* the task's own fine-tuned model
  on the same unlabeled inputs. The teachers are frozen and the data is fixed, so z* is computed once per example
  before step 1 (workers/tta/teachers.py) and arrives with each batch; no label is used. Causal LMs keep the teacher's
  top-k logits per token: the KL is taken over that support (the teacher renormalised on it), which holds almost all
  of its probability mass.

Sequence outputs ([B, L, V]) are averaged over each sequence's valid positions first, then over the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ObjectiveName = Literal["entropy", "infomax", "distill"]
TEACHER_LOGITS = "teacher_logits"  # [N, C] (classification) or [N, L, k] top-k values (causal LM)
TEACHER_INDEX = "teacher_index"  # [N, L, k] vocabulary ids of the top-k values (causal LM only)
# Sums a tensor over the data-parallel group (identity in one process): infomax's batch-mean prediction spans ranks.
GroupSum = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Objective:
    name: ObjectiveName = "distill"
    temperature: float = 1.0  # distill: T of softmax(z/T), loss scaled by T²


def _sequence_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the batch of per-example values; [B, L] values are first averaged over valid positions."""
    if values.dim() == 2:
        mask = torch.ones_like(values) if valid is None else valid.to(values.dtype)
        values = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    return values.mean()


def entropy(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean prediction entropy −Σ_c p·log p."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return _sequence_mean(-(logp.exp() * logp).sum(-1), valid)


def marginal_entropy(probs_sum: Tensor, count: Tensor) -> Tensor:
    """Entropy of the batch-mean prediction from the summed probabilities (near 0: collapsed onto one class)."""
    mean = probs_sum / count.clamp(min=1)
    return -(mean * torch.log(mean.clamp(min=1e-12))).sum()


def infomax(logits: Tensor, valid: Tensor | None = None, group_sum: GroupSum | None = None, world: int = 1) -> Tensor:
    """mean H(p) − H(mean p). With `world` > 1 data-parallel ranks, the batch mean spans all ranks (`group_sum`), and
    the marginal term is the linearisation whose gradient, averaged over ranks, is the full-batch gradient."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    mask = (torch.ones(probs.shape[:-1], device=probs.device) if valid is None or probs.dim() == 2 else valid).to(probs.dtype)
    flat_p, flat_m = probs.reshape(-1, probs.shape[-1]), mask.reshape(-1, 1)
    local_sum, local_count = (flat_p * flat_m).sum(0), flat_m.sum()
    if world == 1 or group_sum is None:
        return entropy(logits, valid) - marginal_entropy(local_sum, local_count)
    total_sum, total_count = group_sum(local_sum.detach()), group_sum(local_count.detach())
    mean = total_sum / total_count.clamp(min=1)
    slope = -(torch.log(mean.clamp(min=1e-12)) + 1.0)  # ∂H(mean)/∂mean
    value = marginal_entropy(total_sum, total_count)
    linear = world * (slope * local_sum).sum() / total_count.clamp(min=1)
    return entropy(logits, valid) - (value + linear - linear.detach())


def distill(logits: Tensor, teacher: Tensor, index: Tensor | None = None, valid: Tensor | None = None,
            temperature: float = 1.0) -> Tensor:
    """KL(teacher ‖ student) at temperature T, times T². `index`: the vocabulary ids of top-k teacher logits."""
    student = torch.log_softmax(logits.float() / temperature, dim=-1)
    if index is not None:
        student = student.gather(-1, index.long())
    target = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (target.exp() * (target - student)).sum(-1)
    return _sequence_mean(kl, valid) * temperature**2


def objective_loss(objective: Objective, logits: Tensor, batch: dict[str, Tensor], valid: Tensor | None,
                   group_sum: GroupSum | None = None, world: int = 1) -> Tensor:
    """The per-task loss of one batch (its teacher rows ride along in the batch for `distill`)."""
    if objective.name == "entropy":
        return entropy(logits, valid)
    if objective.name == "infomax":
        return infomax(logits, valid, group_sum, world)
    if TEACHER_LOGITS not in batch:
        raise ValueError("the distill objective needs the teachers' outputs in each batch")
    teacher, index = batch[TEACHER_LOGITS], batch.get(TEACHER_INDEX)
    if index is None and logits.shape[-1] > teacher.shape[-1]:
        # a ZeRO-3 module's head is as wide as the widest task's; the padded classes have zero probability
        logits = logits[..., : teacher.shape[-1]]
    return distill(logits, teacher, index, valid, objective.temperature)
