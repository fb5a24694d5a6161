"""EntropyWorker: one member of a data-parallel group that turns merged weights into objective gradients ∂L/∂W.

Each step every member takes its slice of each task's batch (the coordinator sends row indices; the data files and
the teacher targets are loaded once per worker), runs the task's own HF model class with the merged backbone and the
task's head, and backpropagates Σ_t loss_t (workers/tta/objectives.py: distill, entropy or infomax) to the merged
weights. The group's gradients are the mean over members, i.e. the
gradient of the full-batch mean, so any group size gives the same objective as one process.

Two ways to hold the model (docs/METHODS.md §4, "Execution"):
- replicated: one meta-weight module per worker driven by `torch.func.functional_call` (ViT/BERT scale); gradients
  are reduced to rank 0 with one collective per tensor.
- zero3: a real module under DeepSpeed ZeRO-3 (LLM scale), each rank holding 1/N of every parameter. Merged weights
  are written straight into each rank's own flat partition (no gather); tasks run one after the other with the task's
  head written in, since a ZeRO parameter has one value across the group, and their gradients accumulate in
  DeepSpeed's partitioned buffers (already the DP mean). Every rank returns its own flat partitions: no rank ever
  holds a full gradient, and the shards join the pieces (workers/spectral_shard.join_gradient).

A step is two calls, load_weights then gradients, so the caller can let go of the weights before gradients exist.
The model runs in `compute_dtype` (bf16 halves the worker's parameters and gradients and what crosses to the shards).

A plain class: the local executor uses it in-process (world 1), the Ray executor wraps each rank in an actor.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from rankmerge.workers.device import resolve_device
from rankmerge.workers.heap import map_large_blocks, return_freed_heap
from rankmerge.workers.tta.adapters import TaskModels, build_task_models, label_count
from rankmerge.workers.tta.data import load_task_data, model_inputs
from rankmerge.workers.tta.objectives import Objective
from rankmerge.workers.tta.teachers import read_teachers
from rankmerge.workers.tta.sources import Sources, open_sources

log = logging.getLogger(__name__)

Partition = Literal["replicated", "zero3"]
# DeepSpeed's defaults suit large GPUs: up to 1e9 gathered parameters kept live and reused (a whole 1B model on every
# rank) and 5e8-element reduce buckets (1-2 GB per rank). Here a rank gathers at most ~1e8 parameters (a decoder layer,
# an embedding), releases each after use, and reduces in 5e7-element buckets.
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": int(1e8),
                          "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": int(5e7),
                          "reduce_bucket_size": int(5e7)},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 2**31 - 1,
}


class EntropyWorker:
    def __init__(self, sources: Sources, data: dict[str, Path], max_length: int, routes: list[list[str]],
                 rank: int = 0, world: int = 1, partition: Partition = "replicated", threads: int | None = None,
                 loaded: tuple[TaskModels, list[dict[str, Tensor]]] | None = None,
                 compute_dtype: torch.dtype = torch.float32, static: frozenset[str] = frozenset(),
                 objective: Objective = Objective(), teachers: Path | None = None, device: str = "auto") -> None:
        """`loaded`: task models and datasets (teacher targets attached) the caller already holds (the in-process
        executor's driver has them for evaluation), so they are not built and read a second time; replicated
        partition only. `static`: merged tensors that are not adapted: they get no gradient. `teachers`: the job's
        teacher-target cache (workers/tta/teachers.py). `device`: the job's setting (workers/device.py), resolved in
        this process."""
        if threads:
            torch.set_num_threads(threads)
        map_large_blocks()
        self.rank, self.world, self.partition, self.routes = rank, world, partition, routes
        self.compute_dtype, self.objective = compute_dtype, objective
        self.leaves: dict[str, Tensor] = {}
        self.label_counts: list[int] = []
        if loaded is not None and partition == "replicated":
            self.models, self.data = loaded
        else:
            with ExitStack() as stack:
                base, tasks, plan = open_sources(sources, stack)
                self.models = build_task_models(plan, base, tasks)
                self.label_counts = [label_count(ck.config) for ck in tasks]
            self.data = [load_task_data(data[name], name, sources.base, max_length) for name in sources.models]
            if teachers is not None:
                for rows, targets in zip(self.data, read_teachers(teachers, list(sources.models))):
                    rows.update(targets)
        self.keys = list(self.models.names[0])  # plan.merged order
        self.learned = [k for k in self.keys if k not in static]
        self.device = resolve_device(device)
        if partition == "replicated":
            self.models = self.models.on(self.device)  # heads, frozen parameters and buffers moved once, not per step
        self.engine = None

    def pid(self) -> int:
        return os.getpid()

    # ---- the process group -------------------------------------------------------------------------------------------
    def join(self, master_addr: str, master_port: int) -> None:
        """Join the group (a collective: every rank calls it at once) and, for zero3, build the partitioned model."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.world > 1 or self.partition == "zero3":
            os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                              WORLD_SIZE=str(self.world), LOCAL_RANK="0")
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=self.world, timeout=datetime.timedelta(minutes=10))
        if self.partition == "zero3":
            frozen = {self.models.names[0][k] for k in self.keys if k not in self.learned}
            self.engine = _zero3_engine(self.models, backend, max(self.label_counts) if self.models.output_kind == "classification" else None,
                                        self.compute_dtype, frozen)
            params = dict(self.engine.module.named_parameters())
            self.grad_views = grad_partition_views(self.engine.optimizer)
            self.zero3_heads = [{n: pad_head(v, params[n].ds_shape) for n, v in head.items()} for head in self.models.heads]
            for name, value in self.models.fixed.items():
                _write_partition(params[name], value, self.rank)

    # ---- one step ------------------------------------------------------------------------------------------------
    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Take this step's merged weights: zero3 copies its slice into its partitions (the caller may then drop them),
        replicated keeps them as the leaves of its backward."""
        if self.partition == "zero3":
            params = dict(self.engine.module.named_parameters())
            names = self.models.names[0]
            with torch.no_grad():
                for key in self.keys:
                    _write_partition(params[names[key]], weights[key], self.rank)
            return
        self.leaves = {k: weights[k].to(self.device, self.compute_dtype).detach().requires_grad_(k in self.learned) for k in self.keys}

    def gradients(self, indices: list[Tensor]) -> tuple[list[dict[str, Tensor]], list[float]]:
        """(∂L/∂W split by route, in the compute dtype — replicated: the full gradient on rank 0, nothing elsewhere;
        zero3: this rank's flat partitions —, per-task mean entropy of the whole batch)."""
        batches = []
        for data, index in zip(self.data, indices):
            mine = torch.tensor_split(index, self.world)[self.rank]
            batches.append({k: v.to(self.device) for k, v in model_inputs(data, mine).items()})
        if self.partition == "zero3":
            grads, losses = self._zero3_gradients(batches)
        else:
            grads, losses = self._replicated_gradients(batches)
        if self.world > 1:
            losses_t = torch.tensor(losses, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
            dist.all_reduce(losses_t)
            losses = (losses_t / self.world).tolist()
        if not grads:
            return [{} for _ in self.routes], losses
        # on this worker's device: in-process the shard shares it; the Ray host copies to the CPU to ship them
        return [{k: grads[k].to(dtype=self.compute_dtype) for k in route if k in grads} for route in self.routes], losses

    def _replicated_gradients(self, batches: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[float]]:
        leaves = self.leaves
        per_task = [self.models.loss(leaves, t, batch, self.objective, _group_sum, self.world) for t, batch in enumerate(batches)]
        grads = torch.autograd.grad(torch.stack(per_task).sum(), [leaves[k] for k in self.learned], allow_unused=True)
        out = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(self.learned, grads)}
        if self.world > 1:
            for g in out.values():
                dist.reduce(g, dst=0)
                g.div_(self.world)
        return (out if self.rank == 0 else {}), torch.stack(per_task).detach().tolist()  # one device sync, not T

    def _zero3_gradients(self, batches: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[float]]:
        engine = self.engine
        params = dict(engine.module.named_parameters())
        names = self.models.names[0]
        flat = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            flat.zero_()  # a parameter no task reaches must read 0, not the last step's gradient
        losses = []
        for t, batch in enumerate(batches):  # each backward adds into the partitioned gradients (the DP mean)
            with torch.no_grad():
                for name, value in self.zero3_heads[t].items():
                    _write_partition(params[name], value, self.rank)
            loss = self.models.loss_of_logits(engine(**self.models.model_kwargs(batch)).logits, batch, self.objective,
                                              _group_sum, self.world)
            engine.backward(loss)
            losses.append(float(loss.detach()))
        # views into DeepSpeed's gradient buffer, no copy: the caller ships them before the next step zeroes it
        local = {key: self.grad_views[params[names[key]].ds_id] for key in self.learned}
        engine.optimizer.zero_grad()
        return local, losses

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _group_sum(value: Tensor) -> Tensor:
    """Sum over the data-parallel group (infomax's batch-mean prediction spans every rank's rows)."""
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def zero3_config(compute_dtype: torch.dtype) -> dict:
    """ZeRO-3 in fp32, or in bf16 with bf16 master weights and gradients: nothing is ever stepped (lr 0), so an fp32
    master copy would only double the partitions."""
    if compute_dtype != torch.bfloat16:
        return ZERO3_CONFIG
    return {**ZERO3_CONFIG, "bf16": {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}}


def _zero3_engine(models: TaskModels, backend: str, num_labels: int | None, compute_dtype: torch.dtype, frozen: set[str]):
    """`frozen`: parameter names that need no gradient (ZeRO-3 then keeps no gradient partition for them)."""
    import deepspeed
    from transformers.utils import logging as hf_logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    deepspeed.init_distributed(backend, dist_init_required=False)
    config = copy.deepcopy(models.model.config)
    if num_labels is not None:  # one module serves every task: its head is as wide as the widest task's
        config.num_labels = num_labels
    ds_config = zero3_config(compute_dtype)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # built in the compute dtype: no fp32 copy of a layer
        module = type(models.model)._from_config(config, dtype=compute_dtype)
    module.eval()
    for name, param in module.named_parameters():
        param.requires_grad_(name not in frozen)
    # Backward through a DeepSpeed engine needs an optimizer; it is never stepped (lr 0): the shards own the update.
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.0), config=ds_config)
    drop_master_copy(engine.optimizer)
    return_freed_heap()
    return engine


def grad_partition_views(optimizer) -> dict[int, Tensor]:
    """ds_id -> this rank's gradient partition as a view into ZeRO-3's flat gradient buffer, laid out as DeepSpeed lays
    it out (trainable parameters in group order, partition_numel() each): read without the fp32 copy that
    safe_get_local_grad makes."""
    flat, views, offset = optimizer.grad_partitions_flat_buffer, {}, 0
    for param in itertools.chain.from_iterable(optimizer.fp16_groups):
        views[param.ds_id] = flat.narrow(0, offset, param.partition_numel())
        offset += param.partition_numel()
    return views


def drop_master_copy(optimizer) -> None:
    """ZeRO-3 clones the trainable partitions as master weights even when they already have the master dtype (bf16
    here: a whole second copy of the model per group). Nothing is ever stepped, so the master copy shares the
    parameters' storage instead."""
    low = getattr(optimizer, "fp16_partitioned_groups_flat", [])
    high = getattr(optimizer, "fp32_partitioned_groups_flat", [])
    for lp, hp in zip(low, high):
        if hp.dtype == lp.dtype and hp.shape == lp.shape and hp.data_ptr() != lp.data_ptr():
            hp.data = lp.data


NEVER_LOGIT = -1.0e4  # exp(-1e4) is exactly 0 in fp32: a padded class gets no probability, entropy or gradient


def pad_head(value: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A task's classifier tensor padded along the label axis to the shared module's (wider) head.

    Padded weight rows are zero and padded biases NEVER_LOGIT, so the task's softmax, entropy and gradients are
    those of its own head.
    """
    shape = tuple(shape)
    if tuple(value.shape) == shape:
        return value
    if value.dim() != len(shape) or tuple(value.shape[1:]) != shape[1:] or value.shape[0] > shape[0]:
        raise ValueError(f"head tensor of shape {tuple(value.shape)} does not fit the shared head {shape}")
    fill = NEVER_LOGIT if value.dim() == 1 else 0.0
    out = torch.full(shape, fill, dtype=value.dtype)
    out[: value.shape[0]] = value
    return out


def _write_partition(param: torch.nn.Parameter, full: Tensor, rank: int) -> None:
    """Write this rank's slice of a ZeRO-3 parameter (its flat, zero-padded partition) from the full value."""
    part = param.ds_tensor
    size = part.numel()
    chunk = full.reshape(-1)[rank * size : (rank + 1) * size]
    part.data[: chunk.numel()].copy_(chunk.to(part.dtype))
    part.data[chunk.numel():].zero_()
