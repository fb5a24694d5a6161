"""Streaming static merge: run a method's statistic passes, then merge tensor by tensor into the writer.

Peak memory is one tensor's inputs (base + T task vectors) plus the method's workspace, never whole models.
No Ray here: the same function runs in-process or inside an actor over a shard of the plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.checkpoint_writer import StreamingCheckpointWriter
from rankmerge.workers.device import device_name, to_device
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods.registry import MergeMethod, TensorInputs
from rankmerge.workers.plan import MergePlan, TensorPlan
from rankmerge.workers.progress import progress
from rankmerge.workers.publish import Publication, publish
from rankmerge.workers.roles import Role

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


def all_finite(x: torch.Tensor) -> bool:
    """NaN/Inf check at reduction speed: a sum is finite iff every entry is (barring fp32 overflow, re-checked exactly)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def load_inputs(entry: TensorPlan, base: ModelCheckpoint, tasks: list[ModelCheckpoint],
                dtype: torch.dtype = torch.float32, pin: bool = False, factors_only: bool = False) -> TensorInputs:
    """Read one tensor from every model and form task vectors (computed in fp32, stored in `dtype`), each written
    straight into its slot: a 16-bit stack never exists in fp32 as a whole. `pin`: stage them in page-locked memory,
    so their copy to a GPU runs asynchronously (the host math is the same). `factors_only` (the method merges this
    tensor from LoRA factors alone): when every task has factors, no dense task vector is formed (see `unformed`)."""
    base_t = base.read(entry.key).float()
    if pin:
        base_t = base_t.pin_memory()
    if not all_finite(base_t):
        raise MergeInputError(f"the base has NaN/Inf values in {entry.key!r}", "use a healthy base checkpoint")
    factors = tuple(ck.low_rank(src) for ck, src in zip(tasks, entry.sources))
    if factors_only and all(f is not None for f in factors):
        for ck, (left, right) in zip(tasks, factors):
            _check_finite(ck, entry, all_finite(left) and all_finite(right))
        return TensorInputs(entry.key, entry.role, base_t, unformed(len(tasks), entry.shape, dtype, base_t.device), factors)
    taus = torch.empty((len(tasks),) + entry.shape, dtype=dtype, pin_memory=pin)
    for t, (ck, src) in enumerate(zip(tasks, entry.sources)):
        if factors[t] is None:
            torch.sub(ck.read(src), base_t, out=taus[t])
        else:  # exactly s·B·A: not (θ0 + s·B·A) − θ0, and the base is not read again
            taus[t].copy_(factors[t][0] @ factors[t][1])
        _check_finite(ck, entry, all_finite(taus[t]))
    return TensorInputs(entry.key, entry.role, base_t, taus, factors if any(f is not None for f in factors) else ())


def _check_finite(ck: ModelCheckpoint, entry: TensorPlan, finite: bool) -> None:
    if not finite:
        raise MergeInputError(
            f"the task vector of {ck.name!r} has NaN/Inf values in {entry.key!r}",
            "that fine-tuned checkpoint is corrupt or diverged: re-export it or leave it out",
        )


def unformed(num_tasks: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [T, ...] stand-in for task vectors that are never formed: the right shape, one stored zero (stride 0)."""
    return torch.zeros((), dtype=dtype, device=device).expand((num_tasks,) + tuple(shape))


def is_unformed(taus: torch.Tensor) -> bool:
    return taus.dim() > 0 and taus.numel() > 1 and all(stride == 0 for stride in taus.stride())


def inputs_on(inputs: TensorInputs, device: torch.device) -> TensorInputs:
    """The same inputs on `device` (themselves on the CPU: the host path is untouched)."""
    if device.type == "cpu":
        return inputs
    factors = tuple(f and (to_device(f[0], device), to_device(f[1], device)) for f in inputs.factors)
    taus = inputs.taus
    taus = unformed(len(taus), taus.shape[1:], taus.dtype, device) if is_unformed(taus) else to_device(taus, device)
    return TensorInputs(inputs.key, inputs.role, to_device(inputs.base, device), taus, factors)


def _progress(total: int, desc: str) -> tqdm:
    return progress(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


PREFETCH_BUDGET_BYTES = 256 * 2**20  # read the next tensor ahead only when its inputs are at most this large


def _pipelined(entries: list[TensorPlan], load, budget: int = PREFETCH_BUDGET_BYTES) -> Iterator[tuple[TensorPlan, Any]]:
    """Yield (entry, load(entry)), reading the next entry in a background thread while the caller computes.

    Reads (preadv) and torch kernels release the GIL, so I/O overlaps compute; the budget bounds the extra memory.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="rankmerge-read") as pool:
        ahead = None
        for i, entry in enumerate(entries):
            current = ahead.result() if ahead is not None else load(entry)
            following = entries[i + 1] if i + 1 < len(entries) else None
            fits = following is not None and following.numel * 4 * (len(following.sources) + 2) <= budget
            ahead = pool.submit(load, following) if fits else None
            yield entry, current
            del current  # else this frame keeps the consumed inputs alive while the next ones are read


def iter_inputs(plan: MergePlan, base: ModelCheckpoint, tasks: list[ModelCheckpoint], desc: str,
                device: torch.device = CPU) -> Iterator[TensorInputs]:
    entries = plan.merged
    pin = device.type == "cuda"
    with _progress(sum(e.numel for e in entries) * 4 * (len(tasks) + 1), desc) as bar:
        for entry, inputs in _pipelined(entries, lambda e: load_inputs(e, base, tasks, pin=pin)):
            yield inputs_on(inputs, device)
            bar.update(entry.numel * 4 * (len(tasks) + 1))


def run_stat_passes(plan: MergePlan, method: MergeMethod, base: ModelCheckpoint, tasks: list[ModelCheckpoint],
                    device: torch.device = CPU) -> list[str]:
    names = []
    for stat_pass in method.stat_passes():
        for inputs in iter_inputs(plan, base, tasks, stat_pass.description, device):
            stat_pass.observe(inputs)
        stat_pass.finish()
        names.append(stat_pass.description)
    return names


def merge_into(
    writer: StreamingCheckpointWriter, plan: MergePlan, method: MergeMethod, base: ModelCheckpoint, tasks: list[ModelCheckpoint],
    device: torch.device = CPU,
) -> dict[str, dict[str, Any]]:
    """Write every planned tensor: merged ones through the method (on `device`), the rest copied from the base.

    Three stages overlap: the next tensor is read while this one is merged, and the previous one is being written.
    On a GPU the inputs are read into pinned memory and the merged tensor comes back to the host for the writer.
    """
    pin = device.type == "cuda"

    def load(entry: TensorPlan):
        if entry.role in (Role.SPECTRAL, Role.ELEMENTWISE):
            return load_inputs(entry, base, tasks, pin=pin, factors_only=method.from_factors(entry.role, entry.shape))
        return base.read(entry.key)

    def write(entry: TensorPlan, value: torch.Tensor) -> None:
        for name in (entry.key, *entry.aliases):
            writer.write(name, value)

    infos: dict[str, dict[str, Any]] = {}
    with _progress(sum(e.numel for e in plan.tensors) * 4 * (len(tasks) + 1), f"merge ({method.name})") as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="rankmerge-write") as write_pool:
        pending = None
        for entry, loaded in _pipelined(plan.tensors, load):
            if isinstance(loaded, TensorInputs):
                loaded = inputs_on(loaded, device)
                delta, info = method.merge(loaded)
                infos[entry.key] = {"delta_norm": round(float(torch.linalg.vector_norm(delta)), 6), **info}
                value = delta.add_(loaded.base).cpu()
            else:
                value, infos[entry.key] = loaded, {}
            del loaded
            if pending is not None:
                pending.result()  # at most one tensor waits to be written
            pending = write_pool.submit(write, entry, value)
            bar.update(entry.numel * 4 * (len(tasks) + 1))
        if pending is not None:
            pending.result()
    return infos


def run_static_merge(pub: Publication, method: MergeMethod, report: Mapping[str, Any] | None = None,
                     device: torch.device = CPU) -> dict[str, Any]:
    """Run the method's statistic passes, then merge straight into the published output (workers/publish.py);
    `report`: the caller's own report fields. Returns the report, which names the device."""
    started = time.perf_counter()
    passes = run_stat_passes(pub.plan, method, pub.base, pub.tasks, device)
    return publish(pub, lambda writer: merge_into(writer, pub.plan, method, pub.base, pub.tasks, device),
                   {**(report or {}), "stat_passes": passes, "device": device_name(device)}, started)
