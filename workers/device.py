"""Where the tensor math runs: `auto` (the GPU when this process sees one), `cpu` or `cuda[:N]`.

The setting is resolved in the process that computes (a Ray actor sees only the GPUs Ray gave it), and everything
that leaves a computation for a file, a report or another process goes back to the host first, so outputs and
checkpoints never depend on the device they were made on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

from rankmerge.workers.errors import MergeInputError

T = TypeVar("T")
DEVICE_SETTING = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICE_HELP = "auto (the GPU when one is visible, else the CPU), cpu, or cuda[:N]"


def check_setting(setting: str) -> str:
    """The spec's syntax check (availability is checked where the work runs: see resolve_device)."""
    if not DEVICE_SETTING.match(setting):
        raise ValueError(f"device {setting!r} is not one of {DEVICE_HELP}")
    return setting


def resolve_device(setting: str) -> torch.device:
    """The device this process computes on; a GPU that is asked for but absent is a user mistake, not a crash."""
    check_setting(setting)
    if setting == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise MergeInputError(f"device {setting!r} was asked for but torch sees no CUDA GPU here "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})",
                              "use device: cpu (or auto), or install the CUDA build of torch (README: GPU machines)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise MergeInputError(f"device {setting!r} was asked for but only {torch.cuda.device_count()} GPU(s) are visible",
                              f"use one of cuda:0 … cuda:{torch.cuda.device_count() - 1}, or device: auto")
    return torch.device("cuda", index)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Host → device; the copy is asynchronous when the host tensor is pinned (see load_inputs' `pin`)."""
    return tensor.to(device, non_blocking=tensor.is_pinned())


def host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached host copies (the tensors themselves when already on the CPU) for files, reports and other processes."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


def device_name(device: torch.device) -> str:
    """`cpu`, or `cuda:0 (NVIDIA H100 …)`: what the report and the summary line say was used."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


class CopyStreams:
    """Host↔device copies of a streamed merge on two side streams of one GPU, so that they overlap the math on its
    compute stream: the next tensor goes up while this one is merged, the last result comes down while the next one
    is merged. Host ends are pinned, so the copies are asynchronous; `of` gives None on the CPU, where nothing moves.

    Memory that one stream fills and another reads is recorded on the reader (`Tensor.record_stream`), so the caching
    allocator never hands it out again before the reading kernels are done."""

    def __init__(self, device: torch.device) -> None:
        self.compute = torch.cuda.current_stream(device)
        self.up, self.down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    @classmethod
    def of(cls, device: torch.device) -> "CopyStreams | None":
        return cls(device) if device.type == "cuda" else None

    def upload(self, move: Callable[[], T]) -> tuple[T, Any]:
        """Run `move` (host → device copies) on the upload stream; any thread may call it (e.g. a read-ahead)."""
        with torch.cuda.stream(self.up):
            moved = move()
            done = torch.cuda.Event()
            done.record(self.up)
        return moved, done

    def arrived(self, tensors: Iterable[Tensor], done: Any) -> None:
        """Make the compute stream wait for an upload before it touches `tensors` (what `upload` moved)."""
        self.compute.wait_event(done)
        for tensor in tensors:
            tensor.record_stream(self.compute)

    def download(self, tensor: Tensor) -> tuple[Tensor, Any]:
        """A pinned host copy of `tensor` once the returned event is done (wait on it before reading the copy)."""
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.down.wait_stream(self.compute)
        with torch.cuda.stream(self.down):
            copy.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.down)
        tensor.record_stream(self.down)
        return copy, done


class DevicePeak:
    """Bytes a block allocated on a GPU at its fullest, above what was allocated when it began: the caching
    allocator's own count, so exact for tensors (library workspaces such as cuSOLVER's are not tensors). On the CPU
    it stays 0: host memory is what RSS measures."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self._start = 0

    def __enter__(self) -> "DevicePeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
