"""The Ray executor: SpectralShards and one EntropyWorker group as Ray actors, driven by the coordinator.

- Placement: shards in one PACK placement group, workers in another (STRICT_PACK for a ZeRO-3 group, so one
  process group lives on one node); bundles carry the spec's CPUs/GPUs per actor and are reused when an actor is
  rebuilt.
- Rank group: rank 0 picks its node address and a free port, every rank then joins at once (gloo on CPU, NCCL on GPU).
- Transport: tensors cross the object store as numpy arrays, which Ray maps zero-copy (torch tensors would be copied);
  receivers wrap them read-only with torch.from_numpy (bf16 travels as its raw bits). Each shard puts its weights in
  the store itself, one tensor at a time, freeing each as it goes (its backward keeps only the graph); each worker pulls every
  shard's weights, and the driver drops them before any gradient is made, so weights and gradients never share the
  store. Gradients come back split per shard — rank 0's full ones (replicated), or every rank's ZeRO-3 partitions —
  so each shard pulls only its own.
- Failure: actors never restart by themselves (their state would be empty); a dead shard or worker surfaces as
  ActorLost, the coordinator calls rebuild() and reloads the last checkpoint. A lost worker takes its whole
  process group down with it (the survivors would wait forever in a collective), so the group is rebuilt.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rankmerge.cluster.coordinator import write_actor_table
from rankmerge.cluster.executor import ActorLost, AdaptiveWork
from rankmerge.cluster.ray_runtime import user_error_of
from rankmerge.workers.entropy_worker import EntropyWorker
from rankmerge.workers.spectral_shard import SpectralShard, assemble_state, slice_state

log = logging.getLogger(__name__)


BF16 = np.dtype([("bfloat16", "<u2")])  # numpy has no bfloat16: its bits travel under this named 2-byte type


def as_numpy(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()  # what crosses processes leaves the GPU here, and only here
        out[k] = v.view(torch.uint16).numpy().view(BF16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def as_torch(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing here writes into them
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v.view(np.uint16)).view(torch.bfloat16) if v.dtype == BF16 else torch.from_numpy(v)
                for k, v in arrays.items()}


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


class ShardHost:
    """A SpectralShard behind a numpy interface (the actor body)."""

    def __init__(self, work: AdaptiveWork, index: int, threads: int | None) -> None:
        _quiet_plan_warnings()
        self.shard = SpectralShard(work.sources, work.params, work.lr, work.columns[index], threads, work.static_keys,
                                   work.shard_device)

    def pid(self) -> int:
        return self.shard.pid()

    def build_seconds(self) -> float:
        return self.shard.build_seconds

    def materialize(self, dtype: str) -> tuple[dict[str, Any], int]:
        """({key: reference}, bytes): each weight is put in the store as soon as it exists and this process drops its
        copy, so a shard never holds more than one merged weight of its own."""
        import ray

        refs, size = {}, 0
        for key, weight in self.shard.iter_materialize(getattr(torch, dtype)):
            array = as_numpy({key: weight})[key]
            refs[key] = ray.put(array)
            size += array.nbytes
            del array, weight
        return refs, size

    def apply_gradients(self, *parts: dict[str, np.ndarray]) -> int:
        return self.shard.apply_gradients([as_torch(p) for p in parts])

    def state(self) -> dict[str, np.ndarray]:
        return as_numpy(self.shard.state())

    def load_state(self, tensors: dict[str, np.ndarray]) -> None:
        self.shard.load_state({k: v.clone() for k, v in as_torch(tensors).items()})

    def weights(self, which: str) -> dict[str, np.ndarray]:
        return as_numpy(self.shard.final_weights() if which == "final" else self.shard.initial_weights())

    def hard_masks(self) -> dict[str, np.ndarray]:
        return as_numpy(self.shard.hard_masks())

    def owners(self) -> dict[str, np.ndarray]:
        return as_numpy(self.shard.owners())

    def learned_ranks(self) -> dict[str, list[int]]:
        return self.shard.learned_ranks()


class WorkerHost:
    """An EntropyWorker rank behind a numpy interface (the actor body)."""

    def __init__(self, work: AdaptiveWork, rank: int, world: int, threads: int | None) -> None:
        _quiet_plan_warnings()
        self.worker = EntropyWorker(work.sources, work.data, work.max_length, work.keys, rank, world, work.partition, threads,
                                    compute_dtype=work.dtype, static=work.static_keys, objective=work.objective,
                                    teachers=work.teachers, device=work.worker_device)

    def pid(self) -> int:
        return self.worker.pid()

    def address(self) -> tuple[str, int]:
        """Rank 0's rendezvous: this node's address and a free port."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, addr: str, port: int) -> None:
        self.worker.join(addr, port)

    def load_weights(self, *refs: dict[str, Any]) -> None:
        """Every shard's {key: reference} (materialize); fetched zero-copy."""
        import ray

        merged = {k: r for part in refs for k, r in part.items()}
        self.worker.load_weights(as_torch(dict(zip(merged, ray.get(list(merged.values()))))))

    def gradients(self, indices: list[Tensor]) -> tuple[Any, ...]:
        """(gradient pieces per shard, …, (losses, their bytes))."""
        grads, losses = self.worker.gradients(indices)
        arrays = [as_numpy(g) for g in grads]
        return (*arrays, (losses, sum(nbytes(a) for a in arrays)))


class RayExecutor:
    def __init__(self, work: AdaptiveWork, job_dir: Path, workers: int, cpus_per_shard: float, cpus_per_worker: float,
                 gpus_per_shard: float, gpus_per_worker: float) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.ray = ray
        self.work, self.job_dir, self.num_workers = work, job_dir, workers
        self.device = f"{work.shard_device} (shards), {work.worker_device} (workers)"
        self.shard_resources = {"num_cpus": cpus_per_shard, "num_gpus": gpus_per_shard}
        self.worker_resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        self.shard_group = placement_group([_bundle(cpus_per_shard, gpus_per_shard)] * len(work.columns), strategy="PACK")
        worker_strategy = "STRICT_PACK" if work.partition == "zero3" else "PACK"
        self.worker_group = placement_group([_bundle(cpus_per_worker, gpus_per_worker)] * workers, strategy=worker_strategy)
        ray.get([self.shard_group.ready(), self.worker_group.ready()])
        self.shards = [self._new_shard(i) for i in range(len(work.columns))]
        self.build_seconds = max(self._check([s.build_seconds.remote() for s in self.shards], "shard"))
        log.info("shards built (read, task vectors, factorizations) in %.1f s (slowest)", self.build_seconds)
        self.workers: list[Any] = []
        self.bytes_last_step = 0
        self._start_workers()
        self._publish_actor_table()

    # ---- actors ------------------------------------------------------------------------------------------------------
    def _options(self, group, index: int, resources: dict[str, float]) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)
        return {"scheduling_strategy": strategy, "max_restarts": 0, "max_task_retries": 0, **resources}

    def _new_shard(self, index: int):
        actor = self.ray.remote(ShardHost).options(**self._options(self.shard_group, index, self.shard_resources))
        return actor.remote(self.work, index, _threads(self.shard_resources["num_cpus"]))

    def _start_workers(self) -> None:
        cls = self.ray.remote(WorkerHost)
        self.workers = [cls.options(**self._options(self.worker_group, rank, self.worker_resources)).remote(
            self.work, rank, self.num_workers, _threads(self.worker_resources["num_cpus"])) for rank in range(self.num_workers)]
        addr, port = self._check([self.workers[0].address.remote()], "worker")[0]
        self._check([w.join.remote(addr, port) for w in self.workers], "worker")

    def _publish_actor_table(self) -> None:
        shard_pids = self._check([s.pid.remote() for s in self.shards], "shard")
        worker_pids = self._check([w.pid.remote() for w in self.workers], "worker")
        write_actor_table(self.job_dir, {"shards": shard_pids, "workers": worker_pids, "partition": self.work.partition,
                                         "columns": self.work.columns})

    def _check(self, refs: list, role: str) -> list:
        """ray.get that turns a dead actor into ActorLost (with the failing index) and unwraps user errors.

        Waits on the refs one at a time as they finish, so a dead rank is noticed even while the others block.
        """
        from ray.exceptions import RayActorError, RayTaskError

        pending = list(refs)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            try:
                self.ray.get(ready[0])
            except RayActorError as exc:
                raise ActorLost(role, refs.index(ready[0]), exc) from None
            except RayTaskError as exc:
                error = user_error_of(exc)
                if error is not None:
                    raise error from None
                raise
        return self.ray.get(refs)

    # ---- the step ------------------------------------------------------------------------------------------------
    def step(self, indices: list[Tensor]) -> tuple[list[float], int]:
        shards = len(self.shards)
        materialized = [s.materialize.options(num_returns=2).remote(self.work.compute_dtype) for s in self.shards]
        weight_refs = self._check([ref for ref, _ in materialized], "shard")
        weight_bytes = sum(self._check([size for _, size in materialized], "shard"))
        self._check([w.load_weights.remote(*weight_refs) for w in self.workers], "worker")
        del weight_refs, materialized  # ZeRO-3 ranks copied their slices: the weights leave the store before gradients enter
        outputs = [w.gradients.options(num_returns=shards + 1).remote(indices) for w in self.workers]
        summaries = self._check([out[shards] for out in outputs], "worker")
        losses = summaries[0][0]
        flips = self._check([s.apply_gradients.remote(*[out[i] for out in outputs]) for i, s in enumerate(self.shards)], "shard")
        # every rank pulls every shard's weights; every shard pulls its gradient pieces from every rank
        self.bytes_last_step = weight_bytes * len(self.workers) + sum(size for _, size in summaries)
        return losses, sum(flips)

    def state(self) -> dict[str, Tensor]:
        states = self._check([s.state.remote() for s in self.shards], "shard")
        return assemble_state([(cols, as_torch(st)) for cols, st in zip(self.work.columns, states)], self.work.num_columns)

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        refs = [s.load_state.remote(as_numpy(slice_state(tensors, keys, cols)))
                for s, keys, cols in zip(self.shards, self.work.keys, self.work.columns)]
        self._check(refs, "shard")

    def rebuild(self, lost: ActorLost) -> None:
        if lost.role == "shard":
            dead = [i for i, s in enumerate(self.shards) if not self._alive(s)]
            for i in dead:
                self.ray.kill(self.shards[i], no_restart=True)
                self.shards[i] = self._new_shard(i)
            log.warning("rebuilt shard(s) %s", dead)
        else:
            for w in self.workers:
                self.ray.kill(w, no_restart=True)
            self._start_workers()
            log.warning("rebuilt the worker group (%d ranks)", self.num_workers)
        self._publish_actor_table()

    def _alive(self, actor) -> bool:
        from ray.exceptions import RayActorError

        try:
            self.ray.get(actor.pid.remote(), timeout=60)
            return True
        except RayActorError:
            return False

    # ---- results -----------------------------------------------------------------------------------------------------
    def weights_by_shard(self, which: str) -> Iterator[dict[str, Tensor]]:
        for shard in self.shards:  # one shard's tensors at a time: the driver never holds the whole model twice
            yield {k: v.clone() for k, v in as_torch(self._check([shard.weights.remote(which)], "shard")[0]).items()}

    def hard_masks(self) -> dict[str, Tensor]:
        return self._gather_tensors("hard_masks")

    def owners(self) -> dict[str, Tensor]:
        return self._gather_tensors("owners")

    def _gather_tensors(self, name: str) -> dict[str, Tensor]:
        """One named tensor per spectral key, from every shard."""
        out: dict[str, Tensor] = {}
        for part in self._check([getattr(s, name).remote() for s in self.shards], "shard"):
            out.update({k: v.clone() for k, v in as_torch(part).items()})
        return out

    def learned_ranks(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for part in self._check([s.learned_ranks.remote() for s in self.shards], "shard"):
            out.update(part)
        return out

    def stop_workers(self) -> None:
        """End the worker group once adaptation is over: export needs only the shards, and the memory."""
        for w in self.workers:
            self.ray.kill(w, no_restart=True)
        self.workers = []

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in [*self.shards, *self.workers]:
            self.ray.kill(actor, no_restart=True)
        remove_placement_group(self.shard_group)
        remove_placement_group(self.worker_group)


def _quiet_plan_warnings() -> None:
    """The driver already warned about the plan (e.g. base-only tensors); actors would repeat it once each."""
    logging.getLogger("rankmerge.workers.plan").setLevel(logging.ERROR)


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def _threads(cpus: float) -> int:
    return max(1, int(cpus))
