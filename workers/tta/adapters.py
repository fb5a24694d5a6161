"""Run each task's own HF model class with merged backbone weights and the task's own head.

One adapter table keyed by architecture class (no per-family subclasses): the class comes from the task models'
config.architectures and must be in the allowlist below (a checkpoint can never make us import an arbitrary class).
One instance is built with empty (meta) parameters and real buffers; every forward supplies parameters through
`torch.func.functional_call`: merged backbone tensors (under the task model's names) plus task t's head tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import transformers
from accelerate import init_empty_weights
from torch import Tensor
from torch.func import functional_call

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.plan import MergePlan
from rankmerge.workers.roles import Role
from rankmerge.workers.tta.objectives import GroupSum, Objective, entropy, objective_loss

# architecture class -> (output kind, input tensor names)
ADAPTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ViTForImageClassification": ("classification", ("pixel_values",)),
    "CLIPForImageClassification": ("classification", ("pixel_values",)),
    "CLIPZeroShotClassifier": ("classification", ("pixel_values",)),  # a CLIP encoder with a zero-shot head (ours)
    "BertForSequenceClassification": ("classification", ("input_ids", "attention_mask")),
    "RobertaForSequenceClassification": ("classification", ("input_ids", "attention_mask")),
    "GPT2ForSequenceClassification": ("classification", ("input_ids", "attention_mask")),
    "LlamaForSequenceClassification": ("classification", ("input_ids", "attention_mask")),
    "LlamaForCausalLM": ("causal_lm", ("input_ids", "attention_mask")),
    "MistralForCausalLM": ("causal_lm", ("input_ids", "attention_mask")),
    "Qwen2ForCausalLM": ("causal_lm", ("input_ids", "attention_mask")),
    "GPT2LMHeadModel": ("causal_lm", ("input_ids", "attention_mask")),
}


@dataclass
class TaskModels:
    """Forward any task through one shared module instance."""

    model: torch.nn.Module
    output_kind: str
    inputs: tuple[str, ...]
    names: list[dict[str, str]]  # per task: base key -> parameter name in the task model
    heads: list[dict[str, Tensor]]  # per task: parameter name -> head tensor
    fixed: dict[str, Tensor]  # parameters taken as they are from the base (frozen float parameters)

    def logits(self, weights: dict[str, Tensor], task: int, batch: dict[str, Tensor]) -> Tensor:
        params = {self.names[task][k]: w for k, w in weights.items()}
        first = next(iter(params.values()))  # heads and frozen parameters follow the merged weights' dtype and device
        params.update({n: v.to(first.device, first.dtype) for n, v in self.heads[task].items()})
        params.update({n: v.to(first.device, first.dtype) for n, v in self.fixed.items()})
        return functional_call(self.model, params, args=(), kwargs=self.model_kwargs(batch)).logits

    def on(self, device: torch.device) -> "TaskModels":
        """These models with heads, frozen parameters and buffers on `device` (a copy: the caller's stay where they
        are); the meta parameters hold no data and stay as they are."""
        if device.type == "cpu":
            return self
        model = copy.deepcopy(self.model)
        for module in model.modules():
            module._buffers.update({n: b.to(device) for n, b in module._buffers.items() if b is not None})
        return replace(self, model=model, heads=[{n: v.to(device) for n, v in h.items()} for h in self.heads],
                       fixed={n: v.to(device) for n, v in self.fixed.items()})

    def model_kwargs(self, batch: dict[str, Tensor]) -> dict[str, Tensor | bool]:
        """The model's inputs; images of another size than the checkpoint's get interpolated position embeddings
        (adaptation on small unlabeled images is much cheaper, and ViT/CLIP support it natively)."""
        kwargs: dict[str, Tensor | bool] = {name: batch[name] for name in self.inputs if name in batch}
        pixels = batch.get("pixel_values")
        config = getattr(self.model.config, "vision_config", self.model.config)
        size = getattr(config, "image_size", None)
        if pixels is not None and size is not None and tuple(pixels.shape[-2:]) != (size, size):
            kwargs["interpolate_pos_encoding"] = True
        return kwargs

    def valid(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Which outputs count: each sequence's real (non-padding) tokens for causal LMs, every row otherwise."""
        return batch.get("attention_mask") if self.output_kind == "causal_lm" else None

    def entropy(self, weights: dict[str, Tensor], task: int, batch: dict[str, Tensor]) -> Tensor:
        return entropy(self.logits(weights, task, batch), self.valid(batch))

    def loss(self, weights: dict[str, Tensor], task: int, batch: dict[str, Tensor], objective: Objective,
             group_sum: GroupSum | None = None, world: int = 1) -> Tensor:
        return self.loss_of_logits(self.logits(weights, task, batch), batch, objective, group_sum, world)

    def loss_of_logits(self, logits: Tensor, batch: dict[str, Tensor], objective: Objective,
                       group_sum: GroupSum | None = None, world: int = 1) -> Tensor:
        """The task's objective on one batch (workers/tta/objectives.py); teacher rows ride in the batch."""
        return objective_loss(objective, logits, batch, self.valid(batch), group_sum, world)


def label_count(config: dict) -> int:
    """Classes of a task model's head from its config.json (0 where it declares none: causal LMs)."""
    return len(config.get("id2label") or {}) or int(config.get("num_labels") or 0)


def model_class(arch: str) -> type | None:
    """A task-model class by name: a transformers class, or this package's own (workers/zero_shot.py)."""
    from rankmerge.workers.zero_shot_model import MODEL_CLASSES

    return MODEL_CLASSES.get(arch) or getattr(transformers, arch, None)


def build_task_models(plan: MergePlan, base: ModelCheckpoint, tasks: list[Checkpoint]) -> TaskModels:
    archs = {tuple(ck.config.get("architectures") or ()) for ck in tasks}
    if len(archs) != 1 or len(next(iter(archs))) != 1:
        raise MergeInputError(f"task models have architectures {sorted(archs)}", "adaptive merging needs one task-model class for all tasks")
    arch = next(iter(archs))[0]
    if arch not in ADAPTERS:
        raise MergeInputError(f"no adapter for task-model class {arch!r}", f"supported: {', '.join(ADAPTERS)}")
    output_kind, input_names = ADAPTERS[arch]
    config = transformers.AutoConfig.for_model(**tasks[0].config)
    with init_empty_weights(include_buffers=False):
        model = model_class(arch)(config)
    model.eval()
    param_names = {n for n, _ in model.named_parameters()}
    to_module = checkpoint_to_module_names(model)
    names, heads = [], []
    fixed: dict[str, Tensor] = {}
    for t, ck in enumerate(tasks):
        mapping = {e.key: to_module(e.sources[t]) for e in plan.merged}
        head = {to_module(h.key): ck.read(h.key) for h in plan.heads.get(ck.name, [])}
        names.append(mapping)
        heads.append(head)
        covered = set(mapping.values()) | set(head)
        for e in plan.tensors:
            if e.role is Role.FROZEN and e.sources[t] and to_module(e.sources[t]) in param_names:
                fixed[to_module(e.sources[t])] = base.read(e.key).float()
        missing = param_names - covered - set(fixed)
        if missing:
            raise MergeInputError(f"task model {ck.name!r} has parameters with no source: {sorted(missing)[:3]}", "check that the task models match the base")
    return TaskModels(model, output_kind, input_names, names, heads, fixed)



def checkpoint_to_module_names(model: torch.nn.Module):
    """Checkpoint key -> parameter name, through transformers' own load-time renamings (5.x renamed many modules)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()

    def rename(key: str) -> str:
        renamed, converted_by = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted_by is not None:
            raise MergeInputError(
                f"{type(model).__name__} converts checkpoint tensor {key!r} when loading (e.g. fused projections)",
                "adaptive merging supports architectures whose checkpoint tensors map one-to-one to parameters",
            )
        return renamed

    return rename
