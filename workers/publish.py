"""Publish one merge output, static or adaptive, through one path.

Weights, per-task heads, the base's side files (config.json with the output dtype, tokenizer, processor), the
caller's own side files, the model card and `merge_report.json` are all written into the writer's temp folder and
swapped into place together: a reader sees the whole output or none of it. Every report starts with the same fields
(method, params, input fingerprints, roles, per-tensor records, heads, side files, wall time, peak memory); a caller
adds its own (statistic passes; the adaptive history, guard, λ, accuracy…) without replacing those.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.checkpoint_writer import StreamingCheckpointWriter
from rankmerge.workers.fingerprint import input_fingerprint
from rankmerge.workers.memory import peak_rss_bytes
from rankmerge.workers.model_card import write_model_card
from rankmerge.workers.plan import MergePlan

REPORT = "merge_report.json"
TensorRecords = dict[str, dict[str, Any]]  # tensor key -> what its record adds to key, role, shape and dtype
WriteWeights = Callable[[StreamingCheckpointWriter], TensorRecords]  # writes every planned tensor, returns records


@dataclass(frozen=True)
class Publication:
    """What one output is and where it goes: everything the common part of its report is made of."""

    out: Path
    plan: MergePlan
    base: ModelCheckpoint
    tasks: list[Checkpoint]
    method: str
    params: dict[str, Any]
    data: Mapping[str, Path] = field(default_factory=dict)  # test-time data per task (adaptive), fingerprinted too
    max_shard_bytes: int = 2 * 10**9
    overwrite: bool = False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_updates(plan: MergePlan) -> dict[str, str]:
    """config.json's `dtype` follows the merged tensors when they share one (`from_pretrained` loads in it)."""
    dtypes = {dtype_name(t.out_dtype) for t in plan.merged}
    return {"dtype": dtypes.pop()} if len(dtypes) == 1 else {}


def input_records(pub: Publication) -> dict[str, Any]:
    """Path and content fingerprint (workers/fingerprint.py) of every input: what `--resume` checks, in the report."""

    def record(path: Path, files: list[Path]) -> dict[str, str]:
        return {"path": str(path), "fingerprint": input_fingerprint(files)}

    out: dict[str, Any] = {"base": record(pub.base.path, pub.base.files),
                           "models": {t.name: record(t.path, t.files) for t in pub.tasks}}
    if pub.data:
        out["data"] = {name: record(path, [path]) for name, path in pub.data.items()}
    return out


def tensor_records(plan: MergePlan, records: TensorRecords) -> list[dict[str, Any]]:
    """One record per written tensor: key, role, shape, output dtype, tied aliases, then what the merge measured."""
    return [{"key": t.key, "role": t.role.value, "shape": list(t.shape), "dtype": dtype_name(t.out_dtype),
             **({"aliases": list(t.aliases)} if t.aliases else {}), **records.get(t.key, {})}
            for t in plan.tensors]


HEAD_CONFIG_KEY = "config"  # head file metadata: the task model's config.json (class, labels), to rebuild that model


def write_heads(writer: StreamingCheckpointWriter, plan: MergePlan, tasks: list[Checkpoint]) -> dict[str, list[str]]:
    """Per-task heads are never merged: each task's head goes to heads/<task>.safetensors under its own names, with
    the task model's config in its metadata (the output's config.json is the base's: other labels, no head class)."""
    written = {}
    for ck in tasks:
        heads = plan.heads.get(ck.name, [])
        if heads:
            metadata = {"task": ck.name, HEAD_CONFIG_KEY: json.dumps(ck.config, sort_keys=True)}
            data = save_safetensors({h.key: ck.read(h.key).contiguous() for h in heads}, metadata=metadata)
            writer.write_side_file(f"heads/{ck.name}.safetensors", data)
            written[ck.name] = [h.key for h in heads]
    return written


def tensor_writer(plan: MergePlan, base: ModelCheckpoint, merged: Mapping[str, torch.Tensor]) -> WriteWeights:
    """Weights merged beforehand (the adaptive export): the given tensors, everything else copied from the base as
    planned; each merged tensor's record holds the norm of its published change, as a static merge's does."""

    def write(writer: StreamingCheckpointWriter) -> TensorRecords:
        records: TensorRecords = {}
        for entry in plan.tensors:
            value = merged.get(entry.key)
            if value is None:
                value = base.read(entry.key)
            else:
                delta = value.float() - base.read(entry.key).float()
                records[entry.key] = {"delta_norm": round(float(torch.linalg.vector_norm(delta)), 6)}
                del delta
            for name in (entry.key, *entry.aliases):
                writer.write(name, value)
        return records

    return write


def publish(pub: Publication, write_weights: WriteWeights, report: Mapping[str, Any], started: float,
            side_files: Mapping[str, bytes] | None = None, records: TensorRecords | None = None) -> dict[str, Any]:
    """Write the whole output and return its report. `report`: the caller's own fields; `started`: perf_counter at
    the job's start (the wall time covers it all); `side_files`: relative path -> bytes; `records`: per-tensor
    fields known before writing (learned ranks), merged into what `write_weights` returns."""
    plan, base = pub.plan, pub.base
    full: dict[str, Any] = {"method": pub.method, "params": pub.params, **input_records(pub)}
    full.update((k, v) for k, v in report.items() if k not in full)
    with StreamingCheckpointWriter(pub.out, plan.layout(), pub.max_shard_bytes, pub.overwrite) as writer:
        measured = write_weights(writer)
        for key, extra in (records or {}).items():
            measured.setdefault(key, {}).update(extra)
        heads = write_heads(writer, plan, pub.tasks)
        copied = writer.copy_side_files(base.path, config_updates(plan) if base.config else None)
        for relpath, data in (side_files or {}).items():
            writer.write_side_file(relpath, data)
        write_model_card(writer, base.path, {t.name: t.path for t in pub.tasks}, pub.method, pub.params, heads)
        full.update({
            "roles": plan.role_counts(),
            "tensors": tensor_records(plan, measured),
            "heads": heads,
            "side_files": [*copied, *(side_files or {})],
            "wall_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
        })
        writer.write_side_file(REPORT, (json.dumps(full, indent=2) + "\n").encode())
    return full
