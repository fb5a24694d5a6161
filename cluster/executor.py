"""The executor interface the coordinator drives, and the in-process (local) executor.

An executor owns shards (SpectralShard: factors, masks, λ, Adam) and a worker group (EntropyWorker: data, model,
entropy gradients). One step: shards materialise merged weights → workers return ∂L/∂W per shard → shards step.
The local executor runs one shard and one worker in this process; cluster/ray_executor.py runs the same classes as
Ray actors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from rankmerge.workers.device import device_name
from rankmerge.workers.entropy_worker import EntropyWorker, Partition
from rankmerge.workers.spectral_shard import SpectralShard, assemble_state, slice_state
from rankmerge.workers.tta.adapters import TaskModels
from rankmerge.workers.tta.objectives import Objective
from rankmerge.workers.tta.params import AdaptiveParams
from rankmerge.workers.tta.sources import Sources


class ActorLost(RuntimeError):
    """A shard or worker process died; the coordinator rebuilds it and resumes from the last checkpoint."""

    def __init__(self, role: str, index: int | None, cause: BaseException) -> None:
        super().__init__(f"{role} {index if index is not None else ''} lost: {cause}")
        self.role, self.index = role, index


@dataclass(frozen=True)
class AdaptiveWork:
    """Everything a shard or worker needs to build itself: picklable, so Ray can ship it to actors."""

    sources: Sources
    params: AdaptiveParams
    lr: float
    data: dict[str, Path]
    max_length: int
    columns: list[list[int]]  # per shard: indices into plan.merged
    keys: list[list[str]]  # per shard: tensor keys (same order as columns)
    num_columns: int
    partition: Partition = "replicated"
    compute_dtype: str = "float32"  # resolved (never "auto"): the workers' model and the weights/gradients they exchange
    static_keys: frozenset[str] = frozenset()  # merged at λ0 and not adapted: no gradient is computed or sent for them
    objective: Objective = Objective()
    teachers: Path | None = None  # the teacher-target cache the driver wrote (workers/tta/teachers.py)
    shard_device: str = "cpu"  # device settings (workers/device.py), resolved in the process that computes
    worker_device: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)


class Executor(Protocol):
    build_seconds: float  # the slowest shard's read + task vectors + factorizations
    bytes_last_step: int  # through the object store in the last step (0 in-process)
    device: str  # where the shards compute, for the report

    def step(self, indices: list[Tensor]) -> tuple[list[float], int]: ...
    def state(self) -> dict[str, Tensor]: ...
    def load_state(self, tensors: dict[str, Tensor]) -> None: ...
    def rebuild(self, lost: ActorLost) -> None: ...
    def stop_workers(self) -> None: ...
    def weights_by_shard(self, which: str) -> Iterator[dict[str, Tensor]]: ...
    def hard_masks(self) -> dict[str, Tensor]: ...
    def owners(self) -> dict[str, Tensor]: ...
    def learned_ranks(self) -> dict[str, list[int]]: ...
    def close(self) -> None: ...


class LocalExecutor:
    """One shard holding every tensor and one replicated worker, in this process (the embedded default)."""

    def __init__(self, work: AdaptiveWork, threads: int | None = None,
                 loaded: tuple[TaskModels, list[dict[str, Tensor]]] | None = None) -> None:
        columns = sorted(c for cols in work.columns for c in cols)
        self.work = work
        self.shard = SpectralShard(work.sources, work.params, work.lr, columns, threads, work.static_keys, work.shard_device)
        self.worker = EntropyWorker(work.sources, work.data, work.max_length, [self.shard.keys], threads=threads, loaded=loaded,
                                    compute_dtype=work.dtype, static=work.static_keys, objective=work.objective,
                                    device=work.worker_device)
        self.device = device_name(self.shard.device)
        self.worker.join("127.0.0.1", 0)
        self.build_seconds = self.shard.build_seconds
        self.bytes_last_step = 0  # nothing leaves the process

    def step(self, indices: list[Tensor]) -> tuple[list[float], int]:
        """Weights and gradients stay on the shared device: nothing goes through the host."""
        self.worker.load_weights(self.shard.materialize(self.work.dtype))
        (grads,), losses = self.worker.gradients(indices)
        return losses, self.shard.apply_gradients([grads])

    def state(self) -> dict[str, Tensor]:
        return assemble_state([(self.shard.columns, self.shard.state())], self.work.num_columns)

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.shard.load_state(slice_state(tensors, self.shard.keys, self.shard.columns))

    def rebuild(self, lost: ActorLost) -> None:
        raise lost  # nothing to rebuild in-process: a dead process is the whole job (resume with --resume)

    def stop_workers(self) -> None:
        self.worker.leaves = {}

    def weights_by_shard(self, which: str) -> Iterator[dict[str, Tensor]]:
        yield self.shard.final_weights() if which == "final" else self.shard.initial_weights()

    def hard_masks(self) -> dict[str, Tensor]:
        return self.shard.hard_masks()

    def owners(self) -> dict[str, Tensor]:
        return self.shard.owners()

    def learned_ranks(self) -> dict[str, list[int]]:
        return self.shard.learned_ranks()

    def close(self) -> None:
        self.worker.close()
