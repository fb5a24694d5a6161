"""The adaptive merger: learnable λ (per task row × tensor) and mask logits (per spectral component), merged weights
rebuilt each step with one GEMM per spectral tensor, and the Adam step. Pure torch; the data and the model come in
through a `loss_fn`, so the same object serves the local loop and (later) a Ray shard."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
from torch import Tensor

from rankmerge.workers.methods.adaptive import (
    MaskedTaskSum,
    TaskVectorSum,
    initial_logits,
    masked_task_matrices,
    refresh_masked_matrix,
    spectral_merge,
    straight_through_mask,
)
from rankmerge.workers.tta.state import ElementwiseSlot, Slot, SpectralSlot


@dataclass(frozen=True)
class AdaptiveOptions:
    temperature: float = 10.0
    learn_lambda: bool = True
    learn_masks: bool = True
    clamp: tuple[float, float] | None = None  # AdaMerging's optional clamp of λ in the forward
    lr: float = 1e-3
    cache_masked: bool | Literal["auto"] = "auto"  # keep M_t = U_t diag(b_t s_t) V_t per task (see caches_masked)


def caches_masked(slot: SpectralSlot, setting: bool | Literal["auto"]) -> bool:
    """Whether a spectral tensor keeps its masked task matrices (T·m·n fp32) instead of one GEMM per forward.

    `auto` caches only where the cache costs at most the factors it is derived from (full-rank fp32 factors of
    ViT-scale models: the forward then skips a T·r·m·n GEMM for ≤ 2× the state); with `max_rank` or 16-bit factors
    the cache would dwarf the factors (LLM scale: 8 × a whole model), so those tensors run the GEMM.
    """
    if setting != "auto":
        return bool(setting)
    rows = int(slot.owner.max()) + 1 if slot.owner.numel() else 0
    cache_bytes = rows * slot.U.shape[0] * slot.Vh.shape[1] * 4
    return cache_bytes <= slot.U.nbytes + slot.Vh.nbytes


class AdaptiveMerger:
    def __init__(self, slots: list[Slot], lam_init: Tensor, options: AdaptiveOptions) -> None:
        self.slots = slots
        self.options = options
        self.num_tasks = lam_init.shape[0] - 1
        self.lam_init = lam_init.clone().float()
        self.lam = self.lam_init.clone().requires_grad_(options.learn_lambda)
        self.logits: dict[str, Tensor] = {
            s.key: initial_logits(s.initial_mask).requires_grad_(options.learn_masks) for s in slots if isinstance(s, SpectralSlot)
        }
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (masked task matrices, hard mask they hold)
        self.cached = {s.key for s in slots if isinstance(s, SpectralSlot) and caches_masked(s, options.cache_masked)}
        params = ([self.lam] if options.learn_lambda else []) + (list(self.logits.values()) if options.learn_masks else [])
        if not params:
            raise ValueError("nothing to learn: enable learn_lambda or learn_masks")
        self.optimizer = torch.optim.Adam(params, lr=options.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def coefficients(self) -> Tensor:
        lo_hi = self.options.clamp
        return self.lam.clamp(*lo_hi) if lo_hi is not None else self.lam

    def masks(self, key: str) -> Tensor:
        """Forward mask values of one spectral tensor (hard 0/1, straight-through gradients when learned)."""
        logits = self.logits[key]
        return straight_through_mask(logits, self.options.temperature) if self.options.learn_masks else (logits > 0).float()

    def merged_weights(self) -> dict[str, Tensor]:
        return dict(self.iter_merged_weights())

    def iter_merged_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(key, fp32 merged weight) one tensor at a time, so a caller can ship and drop each before the next."""
        lam = self.coefficients()
        for k, slot in enumerate(self.slots):
            if isinstance(slot, SpectralSlot) and slot.key in self.cached:
                cache = self._masked_cache(slot)
                yield slot.key, MaskedTaskSum.apply(slot.origin, lam[: cache.shape[0], k], self.masks(slot.key), cache,
                                                    slot.U, slot.s, slot.Vh, slot.owner)
            elif isinstance(slot, SpectralSlot):
                coef = lam[slot.owner, k] * self.masks(slot.key) * slot.s
                yield slot.key, spectral_merge(slot.origin, slot.U, slot.Vh, coef)
            elif slot.taus.shape[0] == 0:  # static: the merge itself, a fresh copy (callers may free what they get)
                yield slot.key, slot.origin.to(torch.float32, copy=True)
            else:
                yield slot.key, TaskVectorSum.apply(slot.origin, lam[: self.num_tasks, k], slot.taus)

    def _masked_cache(self, slot: SpectralSlot) -> Tensor:
        """The masked task matrices for the current hard mask; rows whose mask flipped are recomputed exactly."""
        hard = self.logits[slot.key].detach() > 0
        rows = int(slot.owner.max()) + 1 if slot.owner.numel() else 0
        if slot.key not in self._cache:
            self._cache[slot.key] = (masked_task_matrices(slot.U, slot.s, slot.Vh, slot.owner, hard, rows), hard.clone())
        cache, held = self._cache[slot.key]
        changed = hard != held
        if bool(changed.any()):
            for row in slot.owner[changed].unique().tolist():
                refresh_masked_matrix(cache, row, slot.U, slot.s, slot.Vh, slot.owner, hard)
            held.copy_(hard)
        return cache

    def hard_masks(self) -> dict[str, Tensor]:
        return {key: logits.detach() > 0 for key, logits in self.logits.items()}

    def owners(self) -> dict[str, Tensor]:
        """Per spectral tensor: the λ row of each mask entry (task t, or T for components shared by all tasks)."""
        return {slot.key: slot.owner for slot in self.slots if isinstance(slot, SpectralSlot)}

    def learned_ranks(self) -> dict[str, list[int]]:
        """Per spectral tensor: components kept per λ row (tasks, then the shared row if any)."""
        ranks = {}
        for slot in self.slots:
            if isinstance(slot, SpectralSlot):
                hard = self.logits[slot.key].detach() > 0
                counts = torch.bincount(slot.owner[hard], minlength=self.num_tasks + 1).tolist()
                ranks[slot.key] = counts if bool((slot.owner == self.num_tasks).any()) else counts[: self.num_tasks]
        return ranks

    def step(self, loss_fn: Callable[[dict[str, Tensor]], tuple[Tensor, list[float]]]) -> tuple[float, list[float], int]:
        """One Adam step on Σ_t entropy; returns (loss, per-task entropies, mask entries that flipped)."""
        before = self.hard_masks()
        self.optimizer.zero_grad(set_to_none=True)
        loss, per_task = loss_fn(self.merged_weights())
        loss.backward()
        self.optimizer.step()
        after = self.hard_masks()
        flips = sum(int((before[k] != after[k]).sum()) for k in before)
        return float(loss.detach()), per_task, flips

    @torch.no_grad()
    def initial_weights(self) -> dict[str, Tensor]:
        """The step-0 merge (the static base method), derived from the slots: no snapshot kept, no refactorization."""
        return AdaptiveMerger(self.slots, self.lam_init, replace(self.options, cache_masked=False)).final_weights()

    @torch.no_grad()
    def final_weights(self) -> dict[str, Tensor]:
        """The exported dense weights: hard masks, current λ."""
        return {k: v.detach() for k, v in self.merged_weights().items()}
