"""Run a static merge job in-process: open inputs (headers only), plan, check, then stream the merge."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.device import resolve_device
from rankmerge.workers.checkpoint_writer import check_disk_space, check_output_free, check_output_parent, parse_size
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.forecast import Forecast, forecast, pipeline_extra_bytes
from rankmerge.workers.methods.registry import MergeContext, MergeMethod, make_method
from rankmerge.workers.plan import MergePlan
from rankmerge.workers.publish import Publication, dtype_name
from rankmerge.workers.safetensors_format import nbytes
from rankmerge.workers.roles import Role
from rankmerge.workers.static_merge import CPU, row_blocks, run_static_merge
from rankmerge.workers.tta.sources import open_sources
from rankmerge.workers.zero_shot import prepare_heads

from rankmerge.service.spec import MergeJob

log = logging.getLogger(__name__)


@dataclass
class PreparedMerge:
    job: MergeJob
    base: ModelCheckpoint
    tasks: list[Checkpoint]
    plan: MergePlan
    method: MergeMethod

    def predicted_peak_bytes(self, device: torch.device = CPU) -> int:
        """From shapes: memory now, the largest working set of the units the merge works on there, and what the
        pipeline holds besides (the next unit read ahead, the last one being written)."""
        units = row_blocks(self.plan, self.method, device)
        return (self.plan.predicted_peak_bytes(self.method.task_copies, self.method.factorized, units)
                + pipeline_extra_bytes(units, len(self.tasks)))


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _check_output_location(job: MergeJob) -> None:
    """The output may never be, hold or sit inside an input, the TTA data or the job_dir: publishing with --overwrite
    replaces the whole output folder, which would delete them."""
    out = job.output
    for name, path in [("base", job.base), *job.models.items()]:
        if _overlaps(out, path):
            raise MergeInputError(f"output {out} overlaps the input {name!r} at {path}", "write the output to a separate folder")
    for name, path in job.models.items():
        if path == job.base:
            raise MergeInputError(f"model {name!r} is the base itself ({path}): its task vector is zero",
                                  "give the folder of the checkpoint fine-tuned for that task")
    if job.tta is not None:
        for name, path in job.tta.data.items():
            if _overlaps(out, path):
                raise MergeInputError(f"output {out} overlaps the data of task {name!r} at {path}", "write the output to a separate folder")
        check_job_dir(job)
    check_output_free(out, job.overwrite)
    check_output_parent(out)


def check_job_dir(job: MergeJob) -> None:
    """A job's folder (checkpoints, records, logs) must survive publishing (never the output or inside it), and
    never be, hold or sit inside an input or the TTA data."""
    job_dir = job.resolved_job_dir
    data = job.tta.data.items() if job.tta else ()
    inputs = [("base", job.base), *((f"model {n!r}", p) for n, p in job.models.items()), *((f"tta.data.{n}", p) for n, p in data)]
    for name, path in [*inputs, ("output", job.output)]:
        if job_dir == path or path in job_dir.parents or (name != "output" and job_dir in path.parents):
            raise MergeInputError(f"job_dir {job_dir} overlaps the {name} at {path}",
                                  "give the job its own folder (`job_dir:`, default <output>.job beside the output)")


def _check_base_config(job: MergeJob) -> None:
    """The output copies the base's config.json: without one, from_pretrained cannot load the merge (and the tensor
    rules, chosen by model_type, fall back to generic ones)."""
    if job.base.is_dir() and not (job.base / "config.json").is_file():
        raise MergeInputError(f"base {job.base} has no config.json: the merged output would not load",
                              "copy the pretrained model's config.json into the base folder")


def prepare_zero_shot_heads(job: MergeJob, device: torch.device = CPU) -> None:
    """The spec's zero-shot heads, computed into the job directory once on `device` (reused when already there)."""
    if job.heads:
        prepare_heads(job.heads, job.models, job.clip_model, job.resolved_job_dir, device)


def open_inputs(job: MergeJob, stack: ExitStack, device: torch.device = CPU) -> tuple[ModelCheckpoint, list[Checkpoint], MergePlan]:
    """Everything cheap, in order: output location, headers, config, key/shape/dtype agreement, disk space (and the
    zero-shot heads, computed once per job on `device`)."""
    _check_output_location(job)
    _check_base_config(job)
    prepare_zero_shot_heads(job, device)
    base, tasks, plan = open_sources(job.sources, stack)
    check_disk_space(job.output, sum(nbytes(shape, dtype) for _, dtype, shape in plan.layout()))
    return base, tasks, plan


def publication(job: MergeJob, plan: MergePlan, base: ModelCheckpoint, tasks: list[Checkpoint],
                params: dict[str, Any]) -> Publication:
    """The job's output as workers/publish.py writes it; `params`: the method's validated parameters."""
    data = dict(job.tta.data) if job.tta is not None else {}
    return Publication(job.output, plan, base, tasks, job.method, params, data, parse_size(job.max_shard_size), job.overwrite)


def prepare(job: MergeJob, stack: ExitStack, device: torch.device = CPU) -> PreparedMerge:
    base, tasks, plan = open_inputs(job, stack, device)
    method = make_method(job.method, job.params, MergeContext(tuple(job.models), plan.merged_numel))
    for caveat in method.caveats():
        log.warning(caveat)
    return PreparedMerge(job, base, tasks, plan, method)


def forecast_merge(prepared: PreparedMerge, device: torch.device = torch.device("cpu")) -> Forecast:
    """Time and memory of this merge, measured on one tensor of each shape on `device` (see workers/forecast.py);
    RegMean's solve is timed on identity Gram matrices (its pass over the data is not in the forecast)."""
    job = prepared.job
    names = tuple(job.models)

    def sample_method(numel: int) -> MergeMethod:
        method = make_method(job.method, job.params, MergeContext(names, numel))
        if method.needs_data:
            from rankmerge.workers.tta.grams import identity_grams

            method.grams = identity_grams(prepared.plan, len(names))
        return method

    return forecast(prepared.plan, sample_method, prepared.base, prepared.tasks, job.output, device)


def attach_grams(prepared: PreparedMerge, device: torch.device = CPU) -> None:
    """RegMean's input Gram matrices (workers/tta/grams.py): computed once per job on `device` — each task model over
    the first rows of its `tta.data` — or reused from the job folder when the models, data and row count are the same.
    Imported here: a plain static merge never loads transformers."""
    from rankmerge.cluster.checkpoints import job_identity
    from rankmerge.workers.tta.adapters import build_task_models
    from rankmerge.workers.tta.data import load_task_data
    from rankmerge.workers.tta.grams import prepare_grams, task_grams

    job, plan, tasks, tta = prepared.job, prepared.plan, prepared.tasks, prepared.job.tta
    rows = prepared.method.params.num_regmean_examples
    names = [ck.name for ck in tasks]
    what = hashlib.sha256(json.dumps([job.method, rows, tta.max_length]).encode()).hexdigest()[:16]
    identity = job_identity(what, [prepared.base, *tasks], tta.data.values())
    models: list = []  # built on the first task that has no cached Gram matrices

    def compute(t: int):
        if not models:
            models.append(build_task_models(plan, prepared.base, tasks).on(device))
        data = load_task_data(tta.data[names[t]], names[t], job.base, tta.max_length)
        return task_grams(models[0], plan, tasks[t], t, data, tta.eval_batch_size, rows, device)

    prepared.method.grams = prepare_grams(job.resolved_job_dir, names, identity, compute)


def describe_plan(prepared: PreparedMerge, predicted: Forecast | None = None) -> str:
    """The --dry-run text: every tensor's role, shape and dtype, then totals and the predicted time and memory."""
    plan, job = prepared.plan, prepared.job
    lines = [f"{'tensor':<60} {'role':<12} {'shape':<18} dtype"]
    for t in plan.tensors:
        dtype = dtype_name(t.out_dtype)
        lines.append(f"{t.key:<60} {t.role.value:<12} {'x'.join(map(str, t.shape)) or 'scalar':<18} {dtype}")
        lines.extend(f"{a:<60} {'tied':<12} (copy of {t.key})" for a in t.aliases)
    for task, heads in plan.heads.items():
        lines.extend(f"{h.key:<60} {'head':<12} {'x'.join(map(str, h.shape)):<18} (task {task})" for h in heads)
    counts = ", ".join(f"{n} {role}" for role, n in plan.role_counts().items())
    passes = [p.description for p in prepared.method.stat_passes()]
    lines += [
        "",
        f"architecture rules: {plan.rules.name}; tasks: {', '.join(plan.task_names)}",
        f"method: {job.method} {prepared.method.params.model_dump(by_alias=True)}",
        f"tensors: {counts}; merged entries per model: {plan.merged_numel:,}",
        f"passes over the inputs: {len(passes) + 1} ({', '.join(passes + ['merge'])})",
        predicted.summary() if predicted is not None else f"predicted peak memory: {prepared.predicted_peak_bytes() / 2**30:.2f} GiB",
        f"output: {job.output} (nothing written: dry run)",
    ]
    return "\n".join(lines)


def run_merge_job(job: MergeJob, dry_run: bool = False) -> dict[str, Any] | str:
    """Dry run → the plan text; otherwise merge and return the report."""
    device = resolve_device(job.device)  # an absent GPU is refused before anything is read
    with ExitStack() as stack:
        prepared = prepare(job, stack, device)
        if dry_run:
            return describe_plan(prepared, forecast_merge(prepared, device))
        if prepared.method.needs_data:
            attach_grams(prepared, device)
        log.info("merging %d models with %s into %s on %s", len(prepared.tasks), job.method, job.output, device)
        pub = publication(job, prepared.plan, prepared.base, prepared.tasks, prepared.method.params.model_dump(by_alias=True))
        return run_static_merge(pub, prepared.method,
                                {"out_dtype": job.out_dtype, "predicted_peak_bytes": prepared.predicted_peak_bytes(device)}, device)


def summarize_report(report: dict[str, Any]) -> str:
    merged = [t for t in report["tensors"] if t["role"] in (Role.SPECTRAL.value, Role.ELEMENTWISE.value)]
    return (
        f"merged {len(report['models'])} models with {report['method']} ({len(merged)} tensors merged, "
        f"roles {report['roles']}) on {report.get('device', 'cpu')} in {report['wall_seconds']:.2f} s, "
        f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB"
    )


def run_merge_job_on_ray(job: MergeJob, address: str | None = None) -> dict[str, Any]:
    """A static merge as one Ray task on the cluster (with the spec's CPUs per shard), after the cheap checks here.

    The merge already streams one tensor (or block of rows) at a time in bounded memory, so one task per job is the
    unit; the output path must be visible to the node that runs it (a shared filesystem on a multi-node cluster).
    """
    from rankmerge.cluster.ray_runtime import ensure_ray, run_remote

    with ExitStack() as stack:
        prepare(job, stack)  # every user error surfaces here, before anything is scheduled
    ensure_ray(address, job.resources.cpus_per_shard)
    return run_remote(run_merge_job, job, num_cpus=job.resources.cpus_per_shard)
