"""Predict an adaptive job's wall time and peak memory (in-process executor) from a measured sample of its work.

Like the static forecast (workers/forecast.py), nothing is guessed from FLOP counts: the real code runs on a sample
and is scaled by counts.
- Factorization: one tensor per (role, shape) group goes through the real `make_merger` (reads, task vectors, the
  configured SVD); its time and the exact bytes its slot keeps scale by the group's size.
- A step's merge side: the sampled one-tensor mergers materialise their weight and backpropagate a gradient, as a
  shard does every step.
- A step's model side: one task's real forward and backward on one batch (the base weights as leaves in the compute
  dtype), times the number of tasks; its memory (weights, gradients, activations) is sampled while it runs.
Peak = what the process holds before the job + the whole kept state + the larger of the step's and the
factorization's working set. The Ray executor spreads the same parts over processes; this forecast is per process
for the in-process executor.
On a GPU the samples run there: peak device memory = the kept state (exact bytes, scaled by count, all on the
device) + the larger of the step's and the factorization's measured device working set.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.device import DevicePeak, device_name
from rankmerge.workers.forecast import (Forecast, device_peak_bytes, group_entries, process_age_seconds, timed,
                                        write_seconds_per_byte)
from rankmerge.workers.plan import MergePlan, current_rss_bytes
from rankmerge.workers.safetensors_format import nbytes
from rankmerge.workers.tta.adapters import TaskModels
from rankmerge.workers.tta.data import model_inputs
from rankmerge.workers.tta.engine import AdaptiveMerger
from rankmerge.workers.tta.factory import make_merger
from rankmerge.workers.tta.params import AdaptiveParams
from rankmerge.workers.tta.state import ElementwiseSlot


class PeakRss:
    """Highest resident size of this process while the block runs (sampled every few ms by a thread)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def kept_bytes(merger: AdaptiveMerger) -> int:
    """Bytes a merger keeps between steps: slots, learned parameters, Adam moments, masked-matrix caches."""
    total = 0
    for slot in merger.slots:
        parts = (slot.origin, slot.taus) if isinstance(slot, ElementwiseSlot) else (slot.origin, slot.U, slot.s, slot.Vh, slot.owner)
        total += sum(t.numel() * t.element_size() for t in parts)
    learned = [merger.lam, *merger.logits.values()]
    total += 3 * sum(p.numel() * p.element_size() for p in learned)  # value + two Adam moments
    total += sum(c.numel() * c.element_size() for c, _ in merger._cache.values())
    return total


@dataclass(frozen=True)
class StepSample:
    seconds: float
    rss_peak: int
    device_peak: int = 0  # bytes allocated on a GPU above what it held before (0 on the CPU)


def model_step(models: TaskModels, plan: MergePlan, base: ModelCheckpoint, data: dict[str, Tensor], batch: int,
               dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> StepSample:
    """One task's real forward + backward on one batch, on `device`, with the base weights as the leaves a worker
    would hold."""
    with PeakRss() as rss, DevicePeak(device) as on_device:
        models = models.on(device)
        leaves = {e.key: base.read(e.key).to(device, dtype).requires_grad_(True) for e in plan.merged}
        rows = {k: v.to(device) for k, v in model_inputs(data, torch.arange(min(batch, next(iter(data.values())).shape[0]))).items()}
        models.entropy(leaves, 0, rows).backward()  # the first call pays one-time kernel and allocator set-up
        for leaf in leaves.values():
            leaf.grad = None
        start = time.perf_counter()
        models.entropy(leaves, 0, rows).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        del leaves, models
    return StepSample(seconds, rss.peak, on_device.peak)


def forecast_adaptive(plan: MergePlan, params: AdaptiveParams, lr: float, base: ModelCheckpoint,
                      tasks: list[Checkpoint], models: TaskModels, data: list[dict[str, Tensor]], batch: int,
                      steps: int, dtype: torch.dtype, output_dir, device: torch.device = torch.device("cpu")) -> Forecast:
    """`device`: where the in-process executor's shard and worker compute (the samples run there)."""
    start, startup_s = time.perf_counter(), process_age_seconds()
    before = current_rss_bytes()
    step = model_step(models, plan, base, data[0], batch, dtype, device)
    index = {e.key: i for i, e in enumerate(plan.merged)}
    build_s = merge_s = 0.0
    state_bytes = build_peak = build_device = 0
    groups = group_entries(plan.merged)
    smallest = min(groups.values(), key=lambda e: e[0].numel)
    # untimed: one-time LAPACK/cuSOLVER/allocator set-up
    make_merger(params, lr, plan, base, tasks, [index[smallest[0].key]], device=device)
    for entries in groups.values():
        with PeakRss() as rss, DevicePeak(device) as on_device:
            merger, seconds = timed(lambda: make_merger(params, lr, plan, base, tasks, [index[entries[0].key]], device=device), device)
        build_peak = max(build_peak, rss.peak - before)
        build_device = max(build_device, on_device.peak)
        build_s += seconds * len(entries)
        (_, weight), forward_s = timed(lambda: next(merger.iter_merged_weights()), device)
        _, backward_s = timed(lambda: torch.autograd.backward(weight, torch.ones_like(weight)), device)
        merge_s += (forward_s + backward_s) * len(entries)
        state_bytes += kept_bytes(merger) * len(entries)
        del merger, weight
    out_bytes = sum(nbytes(shape, dtype_) for _, dtype_, shape in plan.layout())
    write_s = out_bytes * write_seconds_per_byte(output_dir)
    step_s = merge_s + step.seconds * len(tasks)
    host_state = 0 if device.type == "cuda" else state_bytes  # on a GPU the state lives there
    peak = before + host_state + max(step.rss_peak - before, build_peak)
    parts = {"start-up": startup_s, "factorization": build_s, "step": step_s, "steps": step_s * steps, "export": write_s}
    return Forecast(startup_s + build_s + step_s * steps + write_s, peak, parts, len(groups), time.perf_counter() - start,
                    device_peak_bytes(device, state_bytes, (step.device_peak, build_device)), device_name(device))

