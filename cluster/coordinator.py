"""The coordinator's step loop: batches from the per-task cursors, one executor step, metrics, atomic checkpoints of
mask logits + λ + Adam state + cursors, and recovery.

Recovery: when the executor reports a lost shard or worker (ActorLost), the coordinator has it rebuilt, reloads the
newest intact checkpoint into every shard, rewinds the cursors and continues — no user action. A checkpoint of the
initial state is written before step 1, so even an early loss resumes. Because shards, data order and the Adam step
are deterministic, the recovered run ends exactly where an uninterrupted one does.

Guard: before each checkpoint (step 0 included) the label-free guard scores the current state on held-out rows
(workers/tta/guard.py); the best state's λ and mask logits ride in every checkpoint (`best/<name>`), its curve in the
metadata, so a resumed job selects exactly what an uninterrupted one selects. A non-finite loss stops the job.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor


from rankmerge.cluster.checkpoints import load_latest_checkpoint, save_checkpoint
from rankmerge.cluster.executor import ActorLost, Executor
from rankmerge.cluster.lease import Lease
from rankmerge.workers.atomic_io import write_atomic
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.progress import progress
from rankmerge.workers.tta.data import IndexStream
from rankmerge.workers.tta.guard import GuardTrack

log = logging.getLogger(__name__)
STATE_FORMAT = 3  # named, shard-independent state (λ by column, masks and Adam moments by tensor key), best state
BEST = "best/"
Guard = Callable[[], list[dict[str, float]]]  # scores the executor's current state per task (held-out, label-free)


def learned_params(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """λ and mask logits of an executor state (no optimizer moments): what the guard keeps of the best step."""
    return {k: v for k, v in state.items() if not k.startswith("adam/") and not k.startswith(BEST)}


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    batch_size: int
    checkpoint_every: int
    keep_checkpoints: int
    max_recoveries: int = 3


class Coordinator:
    def __init__(self, executor: Executor, streams: list[IndexStream], loop: LoopConfig, job_dir: Path, spec_hash: str,
                 guard: Guard | None = None, lease: Lease | None = None) -> None:
        self.executor, self.streams, self.loop = executor, streams, loop
        self.lease = lease  # the driver's lease: every checkpoint commit checks its fencing token
        self.job_dir, self.spec_hash = job_dir, spec_hash
        self.guard, self.track = guard, GuardTrack()
        self.best: dict[str, Tensor] = {}  # λ and mask logits of the guard's best step
        self.history: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []  # wall time of each step this process ran (not checkpointed: not identity)
        self.recoveries = 0
        self.step = 0
        self.resumed_from: int | None = None

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        state = self.executor.state()
        if self.guard is not None:
            tasks = self.guard()
            if self.track.record(self.step, tasks):
                self.best = {k: v.clone() for k, v in learned_params(state).items()}
            point = self.track.curve[-1]
            log.info("guard at step %d: agreement %.4f%s", self.step, point["score"], " (collapsed)" if point["collapsed"] else "")
        meta = {"spec_hash": self.spec_hash, "state_format": STATE_FORMAT, "cursors": [s.state() for s in self.streams],
                "history": self.history, "guard": self.track.state()}
        state.update({BEST + k: v for k, v in self.best.items()})
        save_checkpoint(self.job_dir, self.step, state, meta, self.loop.keep_checkpoints, self.lease)

    def restore(self) -> bool:
        """Load the newest intact checkpoint into the executor and cursors; False when there is none."""
        found = load_latest_checkpoint(self.job_dir, self.spec_hash)
        if found is None:
            return False
        tensors, meta = found
        if meta.get("state_format") != STATE_FORMAT:
            raise MergeInputError(f"the checkpoints in {self.job_dir} were written by an older rankmerge",
                                  "start the job again without --resume in a new job_dir")
        self.best = {k[len(BEST):]: v for k, v in tensors.items() if k.startswith(BEST)}
        self.executor.load_state({k: v for k, v in tensors.items() if not k.startswith(BEST)})
        for stream, cursor in zip(self.streams, meta["cursors"]):
            stream.load_state(cursor)
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))[: self.step]
        self.track.load(meta.get("guard") or {}, self.step)
        return True

    def best_state(self) -> tuple[int, dict[str, Tensor]] | None:
        """(step, λ and mask logits) of the guard's best state, or None without a guard."""
        if self.guard is None or self.track.best_step is None:
            return None
        return self.track.best_step, self.best

    # ---- the loop --------------------------------------------------------------------------------------------------
    def run(self, resume: bool) -> list[dict[str, Any]]:
        if resume and self.restore():
            self.resumed_from = self.step
            log.info("resumed %s at step %d", self.job_dir, self.step)
        elif self.step == 0:
            self.checkpoint()  # step 0: what a recovery rewinds to before the first periodic checkpoint
        with progress(total=self.loop.steps, initial=self.step, desc="adapt", unit="step") as bar:
            while self.step < self.loop.steps:
                indices = [s.next_indices(self.loop.batch_size) for s in self.streams]
                started = time.perf_counter()
                try:
                    losses, flips = self.executor.step(indices)
                except ActorLost as lost:
                    self._recover(lost)
                    bar.n = self.step
                    bar.refresh()
                    continue
                self.step += 1
                self.step_seconds.append(round(time.perf_counter() - started, 3))
                loss = sum(losses)
                if not math.isfinite(loss):
                    raise MergeInputError(f"the adaptation loss became {loss} at step {self.step} (nothing published)",
                                          "check the task data for NaN/inf values, or lower tta.lr")
                # losses are those of the weights this step started from (after step - 1 updates)
                self.history.append({"step": self.step, "loss": round(loss, 6), "flips": flips,
                                     "task_loss": [round(x, 6) for x in losses]})
                log.info("step %d: loss %.6f, %d flips, %.1f s", self.step, loss, flips, self.step_seconds[-1])
                bar.set_postfix(loss=f"{loss:.4f}", flips=flips)
                bar.update(1)
                if self.step % self.loop.checkpoint_every == 0 or self.step == self.loop.steps:
                    self.checkpoint()
        return self.history

    def _recover(self, lost: ActorLost) -> None:
        self.recoveries += 1
        if self.recoveries > self.loop.max_recoveries:
            raise RuntimeError(f"gave up after {self.loop.max_recoveries} recoveries; last: {lost}") from lost
        log.warning("%s; rebuilding and resuming from the last checkpoint (recovery %d)", lost, self.recoveries)
        self.executor.rebuild(lost)
        if not self.restore():
            raise RuntimeError(f"no checkpoint to recover from in {self.job_dir}") from lost
        log.warning("recovered at step %d", self.step)


def write_actor_table(job_dir: Path, table: dict[str, Any]) -> None:
    """job_dir/actors.json: which process holds which shard/worker (for operators, and for fault-injection tests)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(job_dir / "actors.json", json.dumps(table, indent=1))
