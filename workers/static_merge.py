"""Streaming static merge: run a method's statistic passes, then merge tensor by tensor into the writer.

Peak memory is one tensor's inputs (base + T task vectors) plus the method's workspace, never whole models; where the
method merges entry by entry, one block of a tensor's rows (`row_blocks`).
No Ray here: the same function runs in-process or inside an actor over a shard of the plan.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint, factor_rows
from rankmerge.workers.checkpoint_writer import StreamingCheckpointWriter
from rankmerge.workers.device import CopyStreams, device_name, to_device
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


def load_inputs(entry: TensorPlan, base: ModelCheckpoint, tasks: list[Checkpoint],
                dtype: torch.dtype = torch.float32, pin: bool = False, buffer: torch.Tensor | None = None,
                factors_only: bool = False) -> TensorInputs:
    """Read one tensor from every model and form task vectors (computed in fp32, stored in `dtype`), each written
    straight into its slot: a 16-bit stack never exists in fp32 as a whole. `pin`: stage them in page-locked memory,
    so their copy to a GPU runs asynchronously (the host math is the same). `buffer`: bytes to build them in
    (`input_bytes` long, e.g. a block of a `ReadRing`) instead of fresh memory; a task stored in `dtype` is read
    straight into its slot and the base subtracted there, which gives the same values as subtracting into it.
    `factors_only` (the method merges this tensor from LoRA factors alone): when every task has factors, no dense
    task vector is formed (see `unformed`)."""
    slots = _Slots(entry, base, tasks, dtype, buffer)
    base_t = base.read(entry.key, slots.take(base.dtypes[entry.key], torch.float32), entry.rows)
    if base_t.dtype != torch.float32:
        base_t = slots.base.copy_(base_t) if buffer is not None else base_t.float()
    if pin:
        base_t = base_t.pin_memory()
    if not all_finite(base_t):
        raise MergeInputError(f"the base has NaN/Inf values in {entry.key!r}", "use a healthy base checkpoint")
    factors = tuple(factor_rows(ck.low_rank(src), entry.rows) for ck, src in zip(tasks, entry.sources))
    if factors_only and all(f is not None for f in factors):
        for ck, (left, right) in zip(tasks, factors):
            _check_finite(ck, entry, all_finite(left) and all_finite(right))
        return TensorInputs(entry.key, entry.role, base_t, unformed(len(tasks), entry.shape, dtype, base_t.device), factors)
    taus = slots.taus if buffer is not None else torch.empty((len(tasks),) + entry.shape, dtype=dtype, pin_memory=pin)
    for t, (ck, src) in enumerate(zip(tasks, entry.sources)):
        if factors[t] is not None:  # exactly s·B·A: not (θ0 + s·B·A) − θ0, and the base is not read again
            taus[t].copy_(factors[t][0] @ factors[t][1])
        else:
            raw = ck.read(src, slots.take(ck.dtypes[src], dtype, taus[t]), entry.rows)
            if raw.data_ptr() == taus[t].data_ptr():
                taus[t].sub_(base_t)
            else:
                torch.sub(raw, base_t, out=taus[t])
    if not all_finite(taus):  # one reduction over the stack; which task, only when one is not finite
        for ck, tau in zip(tasks, taus):
            _check_finite(ck, entry, all_finite(tau))
    return TensorInputs(entry.key, entry.role, base_t, taus, factors if any(f is not None for f in factors) else ())


def _check_finite(ck: Checkpoint, entry: TensorPlan, finite: bool) -> None:
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


SLOT_ALIGN = 4096  # slots start on page boundaries


def _aligned(nbytes: int) -> int:
    return -(-nbytes // SLOT_ALIGN) * SLOT_ALIGN


def input_bytes(entry: TensorPlan, base: ModelCheckpoint, tasks: list[Checkpoint], dtype: torch.dtype = torch.float32) -> int:
    """Bytes `load_inputs` needs in a buffer: the fp32 base, the [T, ...] task vectors in `dtype` (one contiguous
    stack, laid out as torch.empty lays it out), and one read slot for inputs stored in another dtype (a bf16
    checkpoint), converted out of it."""
    n = entry.numel
    stored = [base.dtypes[entry.key], *(ck.dtypes[src] for ck, src in zip(tasks, entry.sources))]
    wanted = [torch.float32, *([dtype] * len(tasks))]
    scratch = max((n * s.itemsize for s, w in zip(stored, wanted) if s != w), default=0)
    return _aligned(4 * n) + _aligned(len(tasks) * n * dtype.itemsize) + _aligned(scratch)


class _Slots:
    """Views of `load_inputs`' buffer: [base fp32 | task vectors | read slot]; with no buffer, no views."""

    def __init__(self, entry: TensorPlan, base: ModelCheckpoint, tasks: list[Checkpoint], dtype: torch.dtype,
                 buffer: torch.Tensor | None) -> None:
        self.buffer, self.n = buffer, entry.numel
        if buffer is None:
            return
        if buffer.numel() < input_bytes(entry, base, tasks, dtype):
            raise ValueError(f"{entry.key}: an input buffer of {buffer.numel()} bytes is too small")
        taus_start = _aligned(4 * self.n)
        taus_end = taus_start + len(tasks) * self.n * dtype.itemsize
        self.base = buffer[: 4 * self.n].view(torch.float32).view(entry.shape)
        self.taus = buffer[taus_start:taus_end].view(dtype).view((len(tasks),) + entry.shape)
        self.scratch = buffer[_aligned(taus_end):]

    def take(self, stored: torch.dtype, wanted: torch.dtype, slot: torch.Tensor | None = None) -> torch.Tensor | None:
        """Where to read a tensor stored in `stored` that ends up as `wanted` (the base when `slot` is None):
        straight into its slot when the dtypes agree, else into the read slot."""
        if self.buffer is None:
            return None
        if stored == wanted:
            return self.base if slot is None else slot
        return self.scratch[: self.n * stored.itemsize]


def inputs_on(inputs: TensorInputs, device: torch.device) -> TensorInputs:
    """The same inputs on `device` (themselves on the CPU: the host path is untouched)."""
    if device.type == "cpu":
        return inputs
    factors = tuple(f and (to_device(f[0], device), to_device(f[1], device)) for f in inputs.factors)
    taus = inputs.taus
    taus = unformed(len(taus), taus.shape[1:], taus.dtype, device) if is_unformed(taus) else to_device(taus, device)
    return TensorInputs(inputs.key, inputs.role, to_device(inputs.base, device), taus, factors)


def upload(inputs: TensorInputs, device: torch.device, streams: CopyStreams | None) -> tuple[TensorInputs, Any]:
    """`inputs_on`, on a GPU on the upload stream (from the read-ahead thread too); hand the pair to `arrived`."""
    if streams is None:
        return inputs_on(inputs, device), None
    return streams.upload(lambda: inputs_on(inputs, device))


def arrived(staged: tuple[TensorInputs, Any], streams: CopyStreams | None) -> TensorInputs:
    """The uploaded inputs, once the compute stream waits for their copies (on the CPU: the inputs themselves)."""
    inputs, done = staged
    if streams is not None:
        factors = [t for pair in inputs.factors if pair is not None for t in pair]
        streams.arrived([inputs.base, inputs.taus, *factors], done)
    return inputs


def _progress(total: int, desc: str) -> tqdm:
    return progress(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


PREFETCH_BUDGET_BYTES = 256 * 2**20  # read the next tensor ahead only when its inputs are at most this large


class ReadRing:
    """One buffer, allocated once, that the merge loop reads every tensor's inputs into, block after block.

    Fresh buffers per tensor cost a page fault per 4 KiB on first touch (the kernel zeroes each page the read then
    overwrites): ~1.5 M faults and more system time than the reads themselves on a 3 × 1.3 GB merge. Blocks are
    taken in reading order and released in any order but reused only in order (a ring); `take` waits while the ring
    is full, so its size is the extra memory a read-ahead may use. `close` wakes a waiting reader, which raises.
    """

    def __init__(self, nbytes: int) -> None:
        self.size = nbytes
        self._buf = torch.empty(nbytes, dtype=torch.uint8)
        self._live: deque[list] = deque()  # [start, end, released] in taking order
        self._head = 0
        self._closed = False
        self._cond = threading.Condition()

    def take(self, nbytes: int) -> tuple[torch.Tensor, list]:
        """A block of `nbytes` (as a uint8 view) and its handle for `release`; waits for room. Blocks start on
        page boundaries and are never empty, so a ring with blocks whose head meets its tail is a full one."""
        span = _aligned(max(nbytes, 1))
        if span > self.size:
            raise ValueError(f"a block of {nbytes} bytes does not fit a ring of {self.size}")
        with self._cond:
            while (start := self._room(span)) is None:
                self._cond.wait()
            block = [start, start + span, False]
            self._live.append(block)
            self._head = start + span
        return self._buf[start:start + nbytes], block

    def _room(self, nbytes: int) -> int | None:
        if self._closed:
            raise RuntimeError("read ring closed")
        if not self._live:
            return 0
        tail = self._live[0][0]
        if self._head > tail:  # live: [tail, head); free: [head, size) then [0, tail)
            return self._head if self.size - self._head >= nbytes else (0 if tail >= nbytes else None)
        return self._head if tail - self._head >= nbytes else None  # wrapped: free is [head, tail)

    def release(self, block: list) -> None:
        with self._cond:
            block[2] = True
            while self._live and self._live[0][2]:
                self._live.popleft()
            self._cond.notify_all()

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lives in the ring (then its block must outlive every use of it)."""
        return tensor.untyped_storage().data_ptr() == self._buf.untyped_storage().data_ptr()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


PART_BYTES = 16 * 2**20  # a row block's fp32 inputs: they stay in the CPU's caches from the read to the write


def row_blocks(plan: MergePlan, method: MergeMethod, device: torch.device = CPU) -> list[TensorPlan]:
    """The host merge's units of work: every planned tensor, where possible as blocks of its rows (`TensorPlan.rows`)
    of about `PART_BYTES` of inputs.

    Why: a whole tensor's inputs (an embedding's are 0.5 GB with 3 tasks) leave the caches between its read, the
    task vectors, the method and the write — each a pass over memory — and take the whole read ring, so nothing is
    read while it is merged and written. A block is done in the caches while the next one is read, in a ring a few
    blocks long. Split: copied tensors, and merged ones the method merges row by row (`MergeMethod.separable`).
    Whole: tied tensors (their aliases are written with them), and every tensor of a GPU merge."""
    if device.type != "cpu":
        return list(plan.tensors)
    blocks, num_tasks = [], len(plan.task_names)
    for entry in plan.tensors:
        merged = entry.role in (Role.SPECTRAL, Role.ELEMENTWISE)
        row = (entry.numel // entry.shape[0] if entry.shape and entry.shape[0] else 0) * 4 * (num_tasks + 1 if merged else 1)
        if entry.aliases or not row or entry.shape[0] * row <= 2 * PART_BYTES \
                or (merged and not method.separable(entry.role, entry.shape)):
            blocks.append(entry)
            continue
        step, rows = max(1, PART_BYTES // row), entry.shape[0]
        blocks.extend(replace(entry, shape=(min(r + step, rows) - r, *entry.shape[1:]), rows=(r, min(r + step, rows)))
                      for r in range(0, rows, step))
    return blocks


def ahead_bytes(entry: TensorPlan, num_tasks: int) -> int:
    """What reading `entry` ahead may hold at once: its base and task vectors in fp32 and as much again for one."""
    return entry.numel * 4 * (num_tasks + 2)


def read_ahead(entry: TensorPlan, num_tasks: int) -> bool:
    """Whether a merge without a ring reads `entry` while the tensor before it is merged (`_pipelined`'s budget)."""
    return ahead_bytes(entry, num_tasks) <= PREFETCH_BUDGET_BYTES


def ring_bytes(sizes: list[int], budget: int = PREFETCH_BUDGET_BYTES) -> int:
    """A ring that holds the largest block, two of the largest ones a read-ahead may double (≤ budget / 2), and four
    small blocks (row blocks: one read, one merged, one written, one spare)."""
    small = [s for s in sizes if 2 * s <= budget]
    return max(max(sizes, default=0), 2 * max(small, default=0), 4 * min(max(small, default=0), 2 * PART_BYTES), SLOT_ALIGN)


def _pipelined(entries: list[TensorPlan], load, budget: int | None = PREFETCH_BUDGET_BYTES) -> Iterator[tuple[TensorPlan, Any]]:
    """Yield (entry, load(entry)), reading the next entry in a background thread while the caller computes.

    Reads (preadv) and torch kernels release the GIL, so I/O overlaps compute; the budget bounds the extra memory
    (None: always read ahead, for loads that bound it themselves, e.g. by waiting for room in a `ReadRing`).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="rankmerge-read") as pool:
        ahead = None
        for i, entry in enumerate(entries):
            current = ahead.result() if ahead is not None else load(entry)
            following = entries[i + 1] if i + 1 < len(entries) else None
            fits = following is not None and (budget is None or ahead_bytes(following, len(following.sources)) <= budget)
            ahead = pool.submit(load, following) if fits else None
            yield entry, current
            del current  # else this frame keeps the consumed inputs alive while the next ones are read


def iter_inputs(entries: list[TensorPlan], base: ModelCheckpoint, tasks: list[Checkpoint], desc: str,
                device: torch.device = CPU) -> Iterator[TensorInputs]:
    """Every merged entry's inputs in turn, the next one read ahead (within the prefetch budget)."""
    entries = [e for e in entries if e.role in (Role.SPECTRAL, Role.ELEMENTWISE)]
    streams = CopyStreams.of(device)

    def load(entry: TensorPlan) -> tuple[TensorInputs, Any]:
        return upload(load_inputs(entry, base, tasks, pin=streams is not None), device, streams)

    with _progress(sum(e.numel for e in entries) * 4 * (len(tasks) + 1), desc) as bar:
        for entry, staged in _pipelined(entries, load):
            yield arrived(staged, streams)
            bar.update(entry.numel * 4 * (len(tasks) + 1))


def run_stat_passes(plan: MergePlan, method: MergeMethod, base: ModelCheckpoint, tasks: list[Checkpoint],
                    device: torch.device = CPU) -> list[str]:
    names, units = [], row_blocks(plan, method, device)  # a separable method's statistics: per block too
    for stat_pass in method.stat_passes():
        for inputs in iter_inputs(units, base, tasks, stat_pass.description, device):
            stat_pass.observe(inputs)
        stat_pass.finish()
        names.append(stat_pass.description)
    return names


def merge_into(
    writer: StreamingCheckpointWriter, plan: MergePlan, method: MergeMethod, base: ModelCheckpoint, tasks: list[Checkpoint],
    device: torch.device = CPU,
) -> dict[str, dict[str, Any]]:
    """Write every planned tensor: merged ones through the method (on `device`), the rest copied from the base; on
    the host, tensors that `row_blocks` splits go block by block (a unit below is a tensor or a block).

    Three stages overlap: the next tensor is read while this one is merged, and the previous one is being written.
    On the CPU every input is read into one reused `ReadRing`; a block is given back once the method's result no
    longer needs it (after the write when the result is the block itself: a copied tensor, or a merged one summed
    into its base's slot). On a GPU the inputs are
    read into pinned memory and copied up by the read-ahead, and the merged tensor comes back to pinned memory while
    the next one is merged (`CopyStreams`); the writer waits for that copy.
    """
    streams = CopyStreams.of(device)
    pin = streams is not None
    merged = (Role.SPECTRAL, Role.ELEMENTWISE)
    units = row_blocks(plan, method, device)

    def stored_bytes(entry: TensorPlan) -> int:
        return entry.numel * base.dtypes[entry.key].itemsize

    def block_bytes(entry: TensorPlan) -> int:
        return input_bytes(entry, base, tasks) if entry.role in merged else _aligned(stored_bytes(entry))

    ring = None if pin else ReadRing(ring_bytes([block_bytes(e) for e in units]))

    def load(entry: TensorPlan):
        data, block = ring.take(block_bytes(entry)) if ring is not None else (None, None)
        if entry.role in merged:
            inputs = load_inputs(entry, base, tasks, pin=pin, buffer=data, factors_only=method.from_factors(entry.role, entry.shape))
            return upload(inputs, device, streams), block
        return base.read(entry.key, None if data is None else data[: stored_bytes(entry)], entry.rows), block

    def write(entry: TensorPlan, value: torch.Tensor, block: list | None, copied: Any = None) -> None:
        if copied is not None:
            copied.synchronize()  # the result's copy down from the GPU
        for name in (entry.key, *entry.aliases):
            writer.write(name, value, entry.rows[0] if entry.rows else 0)
        if block is not None:
            ring.release(block)

    infos: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # per tensor, (entries, info) of each unit
    # ‖delta‖ per merged unit, in one allocation (0-d tensors kept between the big ones fragment the host heap);
    # a tensor merged in row blocks gets √Σ of its blocks' squares at the end
    norms, slots, counted = torch.empty(len(units), device=device), {}, 0
    loads = _pipelined(units, load, budget=None if ring is not None else PREFETCH_BUDGET_BYTES)
    with _progress(sum(e.numel for e in units) * 4 * (len(tasks) + 1), f"merge ({method.name})") as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="rankmerge-write") as write_pool:
        try:
            pending = None
            for entry, (loaded, block) in loads:
                copied = None
                if isinstance(loaded, tuple):  # a merged tensor's (inputs, upload)
                    loaded = arrived(loaded, streams)
                    delta, info = method.merge(loaded)
                    # read at the end: on a GPU, reading it now would wait for the merge
                    torch.linalg.vector_norm(delta, out=norms[counted])
                    slots.setdefault(entry.key, []).append(counted)
                    counted += 1
                    infos.setdefault(entry.key, []).append((entry.numel, info))
                    # The same sums either way (addition commutes exactly). Into the ring, the delta is freed before
                    # the write; but a block of over half the ring (an embedding's inputs) would then stay taken until
                    # its write ends, and nothing could be read meanwhile: that one is written from the delta.
                    if ring is not None and delta.dtype == loaded.base.dtype and delta.shape == loaded.base.shape \
                            and 2 * block_bytes(entry) <= ring.size:
                        value = loaded.base.add_(delta)
                    elif streams is not None:
                        value, copied = streams.download(delta.add_(loaded.base))
                    else:
                        value = delta.add_(loaded.base)
                    del delta
                else:
                    value, infos[entry.key] = loaded, [(entry.numel, {})]
                del loaded
                if block is not None and not ring.holds(value):
                    ring.release(block)  # the result is the method's own memory: the inputs' block is free now
                    block = None
                if pending is not None:
                    pending.result()  # at most one tensor waits to be written
                pending = write_pool.submit(write, entry, value, block, copied)
                bar.update(entry.numel * 4 * (len(tasks) + 1))
            if pending is not None:
                pending.result()
        finally:
            if ring is not None:
                ring.close()  # a read-ahead waiting for room raises instead of blocking the shutdown below
            loads.close()
    on_host = norms.tolist()
    delta_norms = {key: math.sqrt(math.fsum(on_host[i] ** 2 for i in at)) for key, at in slots.items()}
    joined = {key: joined_info(parts) for key, parts in infos.items()}
    return {key: {"delta_norm": round(delta_norms[key], 6), **info} if key in slots else info for key, info in joined.items()}


def joined_info(parts: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """A tensor's report info from its row blocks' (a separable method's info numbers are per-entry means, such as
    TIES' kept fraction): each number weighted by its block's entries."""
    if len(parts) == 1:
        return parts[0][1]
    total = sum(n for n, _ in parts)
    def mean(key: str, value: Any) -> Any:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return round(sum(n * info[key] for n, info in parts) / total, 6) if numeric else value

    return {key: mean(key, value) for key, value in parts[0][1].items()}


def run_static_merge(pub: Publication, method: MergeMethod, report: Mapping[str, Any] | None = None,
                     device: torch.device = CPU) -> dict[str, Any]:
    """Run the method's statistic passes, then merge straight into the published output (workers/publish.py);
    `report`: the caller's own report fields. Returns the report, which names the device."""
    started = time.perf_counter()
    passes = run_stat_passes(pub.plan, method, pub.base, pub.tasks, device)
    return publish(pub, lambda writer: merge_into(writer, pub.plan, method, pub.base, pub.tasks, device),
                   {**(report or {}), "stat_passes": passes, "device": device_name(device)}, started)
