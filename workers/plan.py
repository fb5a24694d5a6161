"""The merge plan: from headers alone, align every model's keys, give every tensor a role, check that the models
agree, and predict memory. Everything here is cheap, so every input mistake surfaces before any heavy work."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.memory import current_rss_bytes
from rankmerge.workers.roles import ArchitectureRules, Role, classify, is_embedding, is_head, rules_for, tied_source
from rankmerge.workers.safetensors_format import numel

log = logging.getLogger(__name__)
SAME_BASE_FIX = "merge only checkpoints fine-tuned from this base (same architecture and size)"


@dataclass(frozen=True)
class TensorPlan:
    key: str  # name in the base and in the output
    role: Role
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    sources: tuple[str, ...]  # the same tensor's name in each task model
    aliases: tuple[str, ...] = ()  # tied copies written with this tensor's value
    rows: tuple[int, int] | None = None  # a row block [start, stop) of `key` (then `shape` is the block's): see row_blocks

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass(frozen=True)
class HeadTensor:
    key: str
    shape: tuple[int, ...]


@dataclass
class MergePlan:
    rules: ArchitectureRules
    task_names: tuple[str, ...]
    tensors: list[TensorPlan]
    heads: dict[str, list[HeadTensor]] = field(default_factory=dict)

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.role in (Role.SPECTRAL, Role.ELEMENTWISE)]

    @property
    def merged_numel(self) -> int:
        return sum(t.numel for t in self.merged)

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        out = []
        for t in self.tensors:
            out.append((t.key, t.out_dtype, t.shape))
            out.extend((alias, t.out_dtype, t.shape) for alias in t.aliases)
        return out

    def role_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.role.value] = counts.get(t.role.value, 0) + 1 + len(t.aliases)
        counts[Role.HEAD.value] = counts.get(Role.HEAD.value, 0) + sum(len(h) for h in self.heads.values())
        return counts

    def predicted_peak_bytes(self, task_copies: float = 0.0, factorized: Callable[[Role, tuple[int, ...]], bool] | None = None,
                             units: list[TensorPlan] | None = None) -> int:
        """Resident memory now plus the largest per-tensor working set of the merge loop (per unit of `units`, the
        merge's units of work where it merges blocks of rows: `static_merge.row_blocks`).

        Per tensor: the raw read, the fp32 base, T stacked fp32 task vectors, the delta, `task_copies` more [T, ...]
        fp32 temporaries of the method, and for the tensors it factorizes (`factorized(role, shape)`; a method's
        `factorized`) the per-task SVD factors (kept, concatenated and whitened: about three copies). A LoRA adapter
        input reads as a dense tensor of the same size (its factors are small), so the same bound holds.
        """
        num_tasks = len(self.task_names)
        worst = 0
        for t in self.merged if units is None else [u for u in units if u.role in (Role.SPECTRAL, Role.ELEMENTWISE)]:
            n = t.numel
            work = (num_tasks + 3) * 4 * n + task_copies * num_tasks * 4 * n
            if factorized is not None and factorized(t.role, t.shape):
                m, k = t.shape
                r = min(m, k)
                work += 3 * num_tasks * 4 * (m * r + r * k)
            worst = max(worst, work)
        return current_rss_bytes() + int(worst)


def _align(rules: ArchitectureRules, base_keys: set[str], task_keys: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Map a task model's keys to the base's names (task models may wrap the backbone in a prefix).

    Returns (base key -> task key for backbone tensors, task-only head keys, keys the base does not have).
    """
    mapping: dict[str, str] = {}
    heads: list[str] = []
    extras: list[str] = []
    for key in task_keys:
        target = key if key in base_keys else None
        for prefix in rules.prefixes if target is None else ():
            if key.startswith(prefix) and key[len(prefix):] in base_keys:
                target = key[len(prefix):]
            elif prefix + key in base_keys:
                target = prefix + key
            if target:
                break
        if target is not None:
            mapping[target] = key
        elif is_head(rules, key):
            heads.append(key)
        else:
            extras.append(key)
    return mapping, heads, extras


def build_plan(base: ModelCheckpoint, tasks: dict[str, Checkpoint], out_dtype: torch.dtype | None = None) -> MergePlan:
    """Check that every task model matches the base and decide what happens to each tensor."""
    if not tasks:
        raise MergeInputError("no fine-tuned models given", "add at least one --model NAME=PATH")
    base_type = base.config.get("model_type")
    rules = rules_for(base.config)
    for name, ck in tasks.items():
        task_type = ck.config.get("model_type")
        compatible = task_type == base_type or (task_type in rules.model_types and base_type in rules.model_types)
        if base_type and task_type and not compatible:  # e.g. a CLIPVisionModel base with CLIPForImageClassification tasks is fine
            raise MergeInputError(f"architecture mismatch: base is {base_type!r} but {name!r} is {task_type!r}", SAME_BASE_FIX)
    base_keys = set(base.keys())
    alignments: dict[str, dict[str, str]] = {}
    heads: dict[str, list[HeadTensor]] = {}
    for name, ck in tasks.items():
        mapping, head_keys, extras = _align(rules, base_keys, ck.keys())
        if extras:
            raise MergeInputError(f"keys differ: {extras[0]!r} is in {name!r} but not in the base", SAME_BASE_FIX)
        alignments[name] = mapping
        heads[name] = [HeadTensor(k, ck.shapes[k]) for k in head_keys]

    tensors: list[TensorPlan] = []
    base_only: list[str] = []
    tied_to: dict[str, list[str]] = {}
    for key in base.keys():
        source = tied_source(rules, key, base_keys, base.config)
        if source is not None:
            tied_to.setdefault(source, []).append(key)
    for key in base.keys():
        if any(key in aliases for aliases in tied_to.values()):
            continue
        shape, dtype = base.shapes[key], base.dtypes[key]
        role = classify(rules, key, shape, dtype)
        if role in (Role.SPECTRAL, Role.ELEMENTWISE) and all(key not in alignments[n] for n in tasks):
            base_only.append(key)
            role = Role.FROZEN
        sources = []
        for name, ck in tasks.items():
            src = alignments[name].get(key)
            if src is None:
                if role in (Role.FROZEN, Role.HEAD):
                    sources.append("")
                    continue
                raise MergeInputError(f"keys differ: {key!r} is in the base but not in {name!r}", SAME_BASE_FIX)
            if role is Role.HEAD:
                heads[name].append(HeadTensor(src, ck.shapes[src]))
                sources.append(src)
                continue
            if ck.shapes[src] != shape and role is not Role.FROZEN:
                _raise_shape_mismatch(rules, key, shape, name, ck.shapes[src])
            if dtype_kind(ck.dtypes[src]) != dtype_kind(dtype):
                raise MergeInputError(f"dtype mismatch: {key!r} is {ck.dtypes[src]} in {name!r} but {dtype} in the base".replace("torch.", ""),
                                      SAME_BASE_FIX)
            sources.append(src)
        target_dtype = out_dtype if (out_dtype is not None and dtype.is_floating_point) else dtype
        tensors.append(TensorPlan(key, role, shape, target_dtype, tuple(sources), tuple(tied_to.get(key, ()))))
    if base_only:  # one line: a full CLIPModel base under bare image encoders has a whole text tower of them
        log.warning("%d tensor(s) are in the base only (no task model has them), copied from the base: %s", len(base_only),
                    ", ".join(base_only[:3]) + (", …" if len(base_only) > 3 else ""))
    return MergePlan(rules, tuple(tasks), tensors, heads)


def dtype_kind(dtype: torch.dtype) -> str:
    """float / int / bool: a fine-tune may change the precision of a tensor, never what its numbers mean."""
    if dtype.is_floating_point or dtype.is_complex:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def _raise_shape_mismatch(rules, key, base_shape, task, task_shape) -> None:
    if is_embedding(rules, key) and len(base_shape) == 2 and base_shape[1:] == task_shape[1:]:
        raise MergeInputError(
            f"vocabulary mismatch: {key!r} has {task_shape[0]} rows in {task!r} but {base_shape[0]} in the base "
            "(the fine-tune added or removed tokens)",
            "resize the base's embeddings to the fine-tuned tokenizer (model.resize_token_embeddings) and save it, "
            "then merge against that base",
        )
    raise MergeInputError(f"shape mismatch: {key!r} is {list(task_shape)} in {task!r} but {list(base_shape)} in the base", SAME_BASE_FIX)
