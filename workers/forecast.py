"""Predict a static merge's wall time and peak memory before running it, by measuring a sample of the real work.

A formula from shapes alone cannot know this machine's SVD speed, its disk, or how a method's temporaries land in
the allocator; so the forecast runs the real code on one representative unit of the merge (a tensor, or a block of
its rows: `row_blocks`) per (role, shape) group — the real reads from the real files, the method's real stat passes
and merge, the conversion to the output dtype — and scales each group's measured time by its count. Peak memory is
the process's measured peak over those samples (the largest group's working set, read the same way the merge reads
it) plus what the pipelined merge holds on top: the next unit read ahead and the previous result being written.

The sample costs about one tensor of each shape: a few percent of a merge over many layers.

On a GPU the samples run there, as the merge will: peak device memory is the largest sample's allocation plus what
the pipeline holds there besides (the merge works on one tensor at a time while the next one's inputs go up and the
last result comes down: `device_pipeline_bytes`).
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.device import DevicePeak, device_name
from rankmerge.workers.methods.registry import MergeMethod, TensorInputs
from rankmerge.workers.memory import current_rss_bytes, peak_rss_bytes
from rankmerge.workers.plan import MergePlan, TensorPlan
from rankmerge.workers.roles import Role
from rankmerge.workers.safetensors_format import nbytes
from rankmerge.workers.static_merge import CPU, ahead_bytes, inputs_on, load_inputs, read_ahead, row_blocks

log = logging.getLogger(__name__)
WRITE_PROBE_BYTES = 64 * 2**20
CHEAP_SAMPLE_S = 1.0  # samples cheaper than this are repeated (median of up to 5): one read can stall


@dataclass(frozen=True)
class GroupCost:
    role: Role
    shape: tuple[int, ...]
    count: int
    read_s: float  # one pass's reads of one tensor (every model)
    stat_s: float  # all stat passes' compute on one tensor
    merge_s: float  # the merge and the conversion to the output dtype
    prefetched: bool  # small enough to be read ahead while the previous tensor computes

    def seconds(self, passes: int) -> float:
        """Read-ahead overlaps each read with the previous tensor's compute: per tensor and pass the slower of the
        two counts; tensors too large to read ahead pay both."""
        if not self.prefetched:
            return self.count * (passes * self.read_s + self.stat_s + self.merge_s)
        stat_each = self.stat_s / max(1, passes - 1)
        return self.count * ((passes - 1) * max(self.read_s, stat_each) + max(self.read_s, self.merge_s))


@dataclass(frozen=True)
class Forecast:
    seconds: float
    peak_bytes: int
    parts: dict[str, float]  # named parts of the time (seconds)
    shapes: int  # (role, shape) groups sampled
    calibration_s: float
    device_peak_bytes: int | None = None  # on a GPU only: what the job allocates there at its fullest
    device: str = "cpu"

    def summary(self) -> str:
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in self.parts.items())
        on_device = ("" if self.device_peak_bytes is None else
                     f"; predicted peak device memory: {self.device_peak_bytes / 2**30:.2f} GiB on {self.device}")
        return (f"predicted wall time: {self.seconds:.1f} s ({parts}); predicted peak memory: {self.peak_bytes / 2**30:.2f} GiB"
                f"{on_device} (measured on one tensor of each of {self.shapes} shapes in {self.calibration_s:.1f} s)")


def device_peak_bytes(device: torch.device, kept: int, working: Iterable[int]) -> int | None:
    """A GPU's fullest moment: what stays on it for the whole job (`kept`) plus the largest working set of one unit
    of work (one tensor, one step), which run one at a time. None on the CPU (the host peak covers it)."""
    return kept + max(working, default=0) if device.type == "cuda" else None


def group_entries(entries: list[TensorPlan]) -> dict[tuple[Role, tuple[int, ...]], list[TensorPlan]]:
    groups: dict[tuple[Role, tuple[int, ...]], list[TensorPlan]] = {}
    for entry in entries:
        groups.setdefault((entry.role, entry.shape), []).append(entry)
    return groups


def _spread(entries: list[TensorPlan], most: int = 5) -> list[TensorPlan]:
    """Up to `most` members evenly spread over the group: different files, different layers."""
    picks = sorted({round(i * (len(entries) - 1) / max(1, most - 1)) for i in range(most)})
    return [entries[i] for i in picks]


def timed(fn: Callable[[], object], device: torch.device = CPU) -> tuple[object, float]:
    """`fn()` and its seconds; on a GPU, until the kernels it queued have run (they run asynchronously)."""
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def _sample_merged(entry: TensorPlan, method: MergeMethod, base: ModelCheckpoint, tasks: list[Checkpoint], device: torch.device = CPU) -> tuple[float, float, float, int]:
    """(read s, stat-pass s, merge s) of one merged tensor through a fresh method instance sized to that tensor
    (its whole-model statistics, e.g. TIES' k-th magnitude, are then statistics of the sample)."""
    inputs, read_s = timed(lambda: load_inputs(entry, base, tasks, factors_only=method.from_factors(entry.role, entry.shape)))
    assert isinstance(inputs, TensorInputs)
    # on `device`, as the merge computes; and the bytes allocated there at the fullest (0 on the CPU)
    with DevicePeak(device) as on_device:
        inputs = inputs_on(inputs, device)
        stat_s = 0.0
        for stat_pass in method.stat_passes():
            _, spent = timed(lambda: (stat_pass.observe(inputs), stat_pass.finish()), device)
            stat_s += spent

        def merge() -> torch.Tensor:
            delta, _ = method.merge(inputs)
            return delta.add_(inputs.base).cpu().to(entry.out_dtype)

        _, merge_s = timed(merge)
        del inputs
    return read_s, stat_s, merge_s, on_device.peak


def process_age_seconds() -> float:
    """Seconds since this process started (interpreter, imports, headers and plan): a real run pays them too."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def write_seconds_per_byte(directory: Path) -> float:
    """Measured cost of writing and fsyncing a probe file where the output will go (its nearest existing folder:
    a dry run creates nothing)."""
    while not directory.exists():
        directory = directory.parent
    data = os.urandom(WRITE_PROBE_BYTES)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".rankmerge-write-probe-") as fh:
        start = time.perf_counter()
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        return (time.perf_counter() - start) / len(data)


def pipeline_extra_bytes(units: list[TensorPlan], num_tasks: int) -> int:
    """What the pipelined merge holds besides the unit (tensor or row block: `row_blocks`) being merged: the next
    inputs read ahead (only units within the prefetch budget are read ahead) and one result waiting for the writer."""
    ahead = [ahead_bytes(e, num_tasks) for e in units if read_ahead(e, num_tasks)]
    pending = max((nbytes(e.shape, e.out_dtype) for e in units), default=0)
    return max(ahead, default=0) + pending


def device_pipeline_bytes(plan: MergePlan, num_tasks: int) -> int:
    """What a merge on a GPU holds there besides the tensor being merged (`CopyStreams`): the next inputs, uploaded
    by the read-ahead (within the prefetch budget), and the last result on its way down to the host."""
    ahead = [e.numel * 4 * (num_tasks + 1) for e in plan.merged if read_ahead(e, num_tasks)]  # base + task vectors
    return max(ahead, default=0) + max((e.numel * 4 for e in plan.merged), default=0)


def forecast(plan: MergePlan, new_method: Callable[[int], MergeMethod], base: ModelCheckpoint, tasks: list[Checkpoint],
             output: Path, device: torch.device = CPU) -> Forecast:
    """Measure one tensor per (role, shape) group, largest last, on `device`, and extrapolate to the whole merge.

    `new_method(merged_numel)` builds the method for a model of that many merged entries: each sample gets one
    sized to itself, since whole-model statistics over a model the sample is not cannot be computed from it."""
    start, startup_s = time.perf_counter(), process_age_seconds()
    method = new_method(plan.merged_numel)
    units = row_blocks(plan, method, device)  # what the merge will work on
    groups = sorted(group_entries(units).items(), key=lambda kv: kv[1][0].numel)
    passes = len(method.stat_passes()) + 1
    costs, device_working = [], []
    for (role, shape), entries in groups:
        samples = []
        for entry in _spread(entries):
            if role in (Role.SPECTRAL, Role.ELEMENTWISE):
                *seconds, on_device = _sample_merged(entry, new_method(entry.numel), base, tasks, device)
                samples.append(tuple(seconds))
                device_working.append(on_device)
            else:
                samples.append((timed(lambda: base.read(entry.key))[1], 0.0, 0.0))
            if sum(samples[-1]) > CHEAP_SAMPLE_S:
                break  # one sample of an expensive shape is enough; cheap ones are noisy, take the median of a few
        read_s, stat_s, merge_s = (statistics.median(column) for column in zip(*samples))
        prefetched = read_ahead(entries[0], len(tasks))
        costs.append(GroupCost(role, shape, len(entries), read_s, stat_s, merge_s, prefetched))
    out_bytes = sum(nbytes(shape, dtype) for _, dtype, shape in plan.layout())
    write_s = out_bytes * write_seconds_per_byte(output.parent)
    compute = sum(c.seconds(passes if c.role in (Role.SPECTRAL, Role.ELEMENTWISE) else 1) for c in costs)
    peak = max(peak_rss_bytes(), current_rss_bytes()) + pipeline_extra_bytes(units, len(tasks))
    parts = {"start-up": startup_s, f"{passes} pass{'es' if passes > 1 else ''} over the inputs": compute, "write": write_s}
    return Forecast(startup_s + compute + write_s, peak, parts, len(costs), time.perf_counter() - start,
                    device_peak_bytes(device, device_pipeline_bytes(plan, len(tasks)), device_working),
                    device_name(device))
