"""EntropyWorker: one member of a data-parallel group that turns merged weights into entropy gradients ∂L/∂W.

Each step every member takes its slice of each task's batch (the coordinator sends row indices; the data files are
loaded once per worker), runs the task's own HF model class with the merged backbone and the task's head, and
backpropagates Σ_t mean entropy_t to the merged weights. The group's gradients are the mean over members, i.e. the
gradient of the full-batch mean, so any group size gives the same objective as one process.

Two ways to hold the model (ALGORITHMS §10, DESIGN "Adaptive path"):
- replicated: one meta-weight module per worker driven by `torch.func.functional_call` (ViT/BERT scale); gradients
  are reduced to rank 0 with one collective per tensor.
- zero3: a real module under DeepSpeed ZeRO-3 (LLM scale), each rank holding 1/N of every parameter. Merged weights
  are written straight into each rank's own flat partition (no gather); tasks run one after the other with the task's
  head written in, since a ZeRO parameter has one value across the group; `safe_get_full_grad` (a collective) gives
  the DP-mean gradient per tensor.

A plain class: the local executor uses it in-process (world 1), the Ray executor wraps each rank in an actor.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from workers.tta.adapters import TaskModels, build_task_models
from workers.tta.data import load_task_data, model_inputs
from workers.tta.sources import Sources, open_sources

log = logging.getLogger(__name__)

Partition = Literal["replicated", "zero3"]
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 2**31 - 1,
}


class EntropyWorker:
    def __init__(self, sources: Sources, data: dict[str, Path], max_length: int, routes: list[list[str]],
                 rank: int = 0, world: int = 1, partition: Partition = "replicated", threads: int | None = None,
                 loaded: tuple[TaskModels, list[dict[str, Tensor]]] | None = None) -> None:
        """`loaded`: task models and datasets the caller already holds (the in-process executor's driver has them
        for evaluation), so they are not built and read a second time; replicated partition only."""
        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world, self.partition, self.routes = rank, world, partition, routes
        self.label_counts: list[int] = []
        if loaded is not None and partition == "replicated":
            self.models, self.data = loaded
        else:
            with ExitStack() as stack:
                base, tasks, plan = open_sources(sources, stack)
                self.models = build_task_models(plan, base, tasks)
                self.label_counts = [len(ck.config.get("id2label") or {}) or int(ck.config.get("num_labels", 0)) for ck in tasks]
            self.data = [load_task_data(data[name], name, sources.base, max_length) for name in sources.models]
        self.keys = list(self.models.names[0])  # plan.merged order
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
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
            self.engine = _zero3_engine(self.models, backend, max(self.label_counts) if self.models.kind == "classification" else None)
            params = dict(self.engine.module.named_parameters())
            self.zero3_heads = [{n: pad_head(v, params[n].ds_shape) for n, v in head.items()} for head in self.models.heads]
            for name, value in self.models.fixed.items():
                _write_partition(params[name], value, self.rank)

    # ---- one step ------------------------------------------------------------------------------------------------
    def gradients(self, weights: dict[str, Tensor], indices: list[Tensor]) -> tuple[list[dict[str, Tensor]], list[float]]:
        """(∂L/∂W split by route — on rank 0 only, empty elsewhere —, per-task mean entropy of the whole batch)."""
        batches = []
        for data, index in zip(self.data, indices):
            mine = torch.tensor_split(index, self.world)[self.rank]
            batches.append({k: v.to(self.device) for k, v in model_inputs(data, mine).items()})
        if self.partition == "zero3":
            grads, losses = self._zero3_gradients(weights, batches)
        else:
            grads, losses = self._replicated_gradients(weights, batches)
        if self.world > 1:
            losses_t = torch.tensor(losses, dtype=torch.float64)
            dist.all_reduce(losses_t)
            losses = (losses_t / self.world).tolist()
        if self.rank != 0:
            return [{} for _ in self.routes], losses
        return [{k: grads[k].cpu() for k in route} for route in self.routes], losses

    def _replicated_gradients(self, weights: dict[str, Tensor], batches: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[float]]:
        leaves = {k: weights[k].to(self.device).detach().requires_grad_(True) for k in self.keys}
        per_task = [self.models.entropy(leaves, t, batch) for t, batch in enumerate(batches)]
        grads = torch.autograd.grad(torch.stack(per_task).sum(), list(leaves.values()), allow_unused=True)
        out = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)}
        if self.world > 1:
            for g in out.values():
                dist.reduce(g, dst=0)
                g.div_(self.world)
        return out, [float(e.detach()) for e in per_task]

    def _zero3_gradients(self, weights: dict[str, Tensor], batches: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[float]]:
        from deepspeed.utils import safe_get_full_grad

        engine = self.engine
        params = dict(engine.module.named_parameters())
        names = self.models.names[0]
        with torch.no_grad():
            for key in self.keys:
                _write_partition(params[names[key]], weights[key], self.rank)
        total: dict[str, Tensor] = {}
        losses = []
        for t, batch in enumerate(batches):
            with torch.no_grad():
                for name, value in self.zero3_heads[t].items():
                    _write_partition(params[name], value, self.rank)
            entropy = self.models.entropy_of_logits(engine(**self.models.model_kwargs(batch)).logits, batch)
            engine.backward(entropy)
            for key in self.keys:  # same order on every rank: each call is a collective
                grad = safe_get_full_grad(params[names[key]])
                grad = torch.zeros(weights[key].shape) if grad is None else grad.detach().reshape(weights[key].shape).float()
                total[key] = total[key] + grad if key in total else grad.clone()
            engine.optimizer.zero_grad()
            losses.append(float(entropy.detach()))
        return total, losses

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _zero3_engine(models: TaskModels, backend: str, num_labels: int | None):
    import deepspeed
    from transformers.utils import logging as hf_logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    hf_logging.set_verbosity_error()
    deepspeed.init_distributed(backend, dist_init_required=False)
    config = copy.deepcopy(models.model.config)
    if num_labels is not None:  # one module serves every task: its head is as wide as the widest task's
        config.num_labels = num_labels
    with deepspeed.zero.Init(config_dict_or_path=ZERO3_CONFIG):
        module = type(models.model)(config)
    module.eval()
    # Backward through a DeepSpeed engine needs an optimizer; it is never stepped (lr 0): the shards own the update.
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.0), config=ZERO3_CONFIG)
    return engine


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
