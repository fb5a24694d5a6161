"""SpectralShard: owns a subset of the merged tensors (columns of the plan) for adaptive merging.

It reads its own tensors from the checkpoints (headers first, then only its rows), builds task vectors and their
factorizations, and holds factors, mask logits, its λ columns and their Adam state. Each step it materialises its
merged weights, later receives the weight gradients ∂L/∂W from the entropy workers, turns them into mask/λ gradients
(the closed-form backward of workers/methods/adaptive.py) and steps. A plain class: the local executor calls it
in-process, the Ray executor wraps it in an actor.

State is named globally (by tensor key, λ by column), so a checkpoint written with S shards restores into any number
of shards, and into the single in-process shard of the local executor.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack

import torch
from torch import Tensor

from rankmerge.workers.device import host, resolve_device
from rankmerge.workers.heap import map_large_blocks
from rankmerge.workers.tta.engine import AdaptiveMerger
from rankmerge.workers.tta.factory import make_merger
from rankmerge.workers.tta.params import AdaptiveParams
from rankmerge.workers.tta.sources import Sources, open_sources
from rankmerge.workers.tta.state import SpectralSlot

LAMBDA = "lambda"  # λ columns: [T+1, len(columns)] in this shard, [T+1, K] in a checkpoint
ADAM_FIELDS = ("exp_avg", "exp_avg_sq")


class SpectralShard:
    def __init__(self, sources: Sources, params: AdaptiveParams, lr: float, columns: list[int],
                 threads: int | None = None, static: frozenset[str] = frozenset(), device: str = "cpu") -> None:
        """`device`: a setting (workers/device.py) resolved here, in the process that holds the state."""
        if threads:
            torch.set_num_threads(threads)
        map_large_blocks()
        self.columns = list(columns)
        self.device = resolve_device(device)
        start = time.perf_counter()
        with ExitStack() as stack:
            base, tasks, plan = open_sources(sources, stack)
            self.merger: AdaptiveMerger = make_merger(params, lr, plan, base, tasks, self.columns, static, self.device)
        self.build_seconds = time.perf_counter() - start  # read + task vectors + factorizations
        self.keys = [slot.key for slot in self.merger.slots]
        self._pending: dict[str, Tensor] | None = None
        self._before: dict[str, Tensor] = {}

    def pid(self) -> int:
        return os.getpid()

    # ---- the step, split in two halves around the workers' forward/backward ----------------------------------
    def materialize(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Current merged weights in `dtype` on the shard's device (hard masks, current λ); the autograd graph is kept
        for apply_gradients."""
        return dict(self.iter_materialize(dtype, shipped=False))

    def iter_materialize(self, dtype: torch.dtype, shipped: bool = True) -> Iterator[tuple[str, Tensor]]:
        """The merged weights one at a time. An fp32 weight is freed once its 16-bit copy exists, and — `shipped`: the
        caller has sent each one on before asking for the next — the copy too: the backward needs only the graph."""
        self._before = self.merger.hard_masks()
        self.merger.optimizer.zero_grad(set_to_none=True)
        self._pending = {}
        for key, weight in self.merger.iter_merged_weights():
            self._pending[key] = weight
            out = weight.detach().to(dtype)
            if out.data_ptr() != weight.data_ptr():
                _free(weight)
            yield key, out
            if shipped:
                _free(weight)

    def apply_gradients(self, parts: list[dict[str, Tensor]]) -> int:
        """Backpropagate ∂L/∂W into masks and λ, step Adam; returns how many mask entries flipped.

        `parts`: what each worker rank sent for this shard's tensors (see join_gradient), on any device (moved to the
        shard's; in-process they are already there). One tensor at a time, so at most one full-size gradient is formed
        here at once.
        """
        if self._pending is None:
            raise RuntimeError("apply_gradients without a materialize first")
        outputs = [(k, w) for k, w in self._pending.items() if w.requires_grad]
        for i, (key, weight) in enumerate(outputs):
            grad = join_gradient([p[key] for p in parts if key in p], weight.shape).to(weight.device, weight.dtype)
            torch.autograd.backward(weight, grad, retain_graph=i + 1 < len(outputs))  # λ may pass a shared clamp
        self.merger.optimizer.step()
        self._pending = None
        after = self.merger.hard_masks()
        flips = [(self._before[k] != after[k]).sum() for k in after]
        return int(torch.stack(flips).sum()) if flips else 0  # one device sync per step, not one per tensor

    # ---- checkpoint state ----------------------------------------------------------------------------------------
    def _named_params(self) -> dict[str, Tensor]:
        named = {LAMBDA: self.merger.lam}
        named.update({f"mask/{k}": v for k, v in self.merger.logits.items()})
        return named

    def state(self) -> dict[str, Tensor]:
        """λ columns, mask logits and Adam moments, named globally ('adam/<param>/<field>'), always on the CPU: a
        checkpoint does not depend on the device it was written on."""
        out: dict[str, Tensor] = {}
        opt_state = self.merger.optimizer.state
        for name, param in self._named_params().items():
            out[name] = param.detach().clone()
            moments = opt_state.get(param)
            if moments:
                for field in (*ADAM_FIELDS, "step"):
                    out[f"adam/{name}/{field}"] = moments[field].detach().clone().reshape(-1) if field == "step" else moments[field].detach().clone()
        return host(out)

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore from globally named state already cut to this shard's columns (see slice_state), written on any
        device: moments go to their parameter's device, Adam's step counter stays on the CPU where Adam keeps it."""
        opt = self.merger.optimizer
        with torch.no_grad():
            for name, param in self._named_params().items():
                param.copy_(tensors[name])
                if f"adam/{name}/exp_avg" in tensors:
                    opt.state[param] = {"step": tensors[f"adam/{name}/step"].to("cpu", copy=True).reshape(()).float(),
                                        **{f: tensors[f"adam/{name}/{f}"].to(param.device, copy=True) for f in ADAM_FIELDS}}
                else:
                    opt.state.pop(param, None)
        self._pending = None

    # ---- results (on the CPU: they go to files, reports and the driver) ---------------------------------------------
    def final_weights(self) -> dict[str, Tensor]:
        return host(self.merger.final_weights())

    def initial_weights(self) -> dict[str, Tensor]:
        return host(self.merger.initial_weights())

    def hard_masks(self) -> dict[str, Tensor]:
        return host(self.merger.hard_masks())

    def owners(self) -> dict[str, Tensor]:
        return host(self.merger.owners())

    def learned_ranks(self) -> dict[str, list[int]]:
        return self.merger.learned_ranks()

    def num_components(self) -> int:
        return sum(int(s.s.numel()) for s in self.merger.slots if isinstance(s, SpectralSlot))


def _free(weight: Tensor) -> None:
    """Drop a merged weight's memory but keep its autograd node and shape (no function that makes it saves its
    output): its data becomes one broadcast element. Not a storage resize: storages shared with numpy cannot shrink."""
    weight.data = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)


def join_gradient(pieces: list[Tensor], shape: torch.Size) -> Tensor:
    """∂L/∂W of one tensor from the ranks' pieces: one full gradient (replicated rank 0), or every rank's flat ZeRO-3
    partition in rank order, the last one zero-padded."""
    if len(pieces) == 1 and tuple(pieces[0].shape) == tuple(shape):
        return pieces[0]
    numel = math.prod(shape)
    return torch.cat([p.reshape(-1) for p in pieces])[:numel].reshape(shape)


def is_column_state(name: str) -> bool:
    """λ and its Adam moments are split by column across shards; everything else is owned whole by one shard."""
    return name == LAMBDA or (name.startswith(f"adam/{LAMBDA}/") and not name.endswith("/step"))


def slice_state(tensors: dict[str, Tensor], keys: list[str], columns: list[int]) -> dict[str, Tensor]:
    """The part of a global checkpoint that one shard (its tensor keys and λ columns) restores."""
    out: dict[str, Tensor] = {}
    index = torch.tensor(columns, dtype=torch.long)
    for name, value in tensors.items():
        if is_column_state(name):
            out[name] = value[:, index].contiguous()
        elif name == f"adam/{LAMBDA}/step":
            out[name] = value
        elif name.startswith("mask/") and name[5:] in keys:
            out[name] = value
        elif name.startswith("adam/mask/") and name[10:].rsplit("/", 1)[0] in keys:
            out[name] = value
    return out


def assemble_state(parts: list[tuple[list[int], dict[str, Tensor]]], num_columns: int) -> dict[str, Tensor]:
    """Join every shard's state (with its λ columns) into one globally named checkpoint."""
    out: dict[str, Tensor] = {}
    for columns, tensors in parts:
        index = torch.tensor(columns, dtype=torch.long)
        for name, value in tensors.items():
            if is_column_state(name):
                if name not in out:
                    out[name] = torch.zeros(value.shape[0], num_columns, dtype=value.dtype)
                out[name][:, index] = value
            else:
                out[name] = value
    return out
