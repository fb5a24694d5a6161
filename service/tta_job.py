"""Run an adaptive (AdaRank / AdaMerging) job: validate, hand the step loop to the coordinator on the local or the Ray
executor, export, evaluate.

Resume: the loop state is λ, mask logits, Adam state and the per-task data cursors; nothing is random besides the
data order (seeded by cursor), so resuming from a checkpoint reproduces an uninterrupted run bit for bit, and a
checkpoint written by either executor resumes on the other. The teacher targets (workers/tta/teachers.py) are
computed once per job and reused on resume; the label-free guard (workers/tta/guard.py) picks the published state.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save as save_safetensors

from rankmerge.cluster.checkpoints import job_identity
from rankmerge.cluster.coordinator import Coordinator, Guard, LoopConfig
from rankmerge.cluster.executor import AdaptiveWork, Executor, LocalExecutor
from rankmerge.cluster.sharding import shard_columns
from rankmerge.service.driver import take_driver_lease
from rankmerge.service.merge_job import open_inputs, prepare_zero_shot_heads, publication
from rankmerge.service.spec import MergeJob, parse_adaptive_params
from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.checkpoint_writer import check_output_free
from rankmerge.workers.device import resolve_device
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods.registry import MergeContext
from rankmerge.workers.plan import MergePlan, build_plan
from rankmerge.workers.publish import publish, tensor_writer
from rankmerge.workers.tta.adapters import TaskModels, build_task_models, label_count
from rankmerge.workers.tta.data import TARGET_KEYS, IndexStream, load_task_data, model_inputs, num_rows
from rankmerge.workers.tta.engine import AdaptiveMerger
from rankmerge.workers.tta.factory import make_merger, static_keys
from rankmerge.workers.tta.forecast import forecast_adaptive
from rankmerge.workers.tta.guard import GuardTally, holdout_split, reference_labels
from rankmerge.workers.tta.objectives import Objective
from rankmerge.workers.tta.sources import open_tasks
from rankmerge.workers.tta.teachers import CACHE, load_teachers, save_teachers, teacher_targets

log = logging.getLogger(__name__)
ExecutorName = Literal["local", "ray"]


class AdaptationDegraded(MergeInputError):
    """--strict: the adaptation ended worse than its step-0 merge by the label-free guard (nothing is published)."""


def build_merger(job: MergeJob, plan: MergePlan, base: ModelCheckpoint, tasks: list[Checkpoint]) -> AdaptiveMerger:
    """The whole job's merger in one object (tests and benchmarks; jobs run through shards)."""
    return make_merger(parse_adaptive_params(job.method, job.params), job.tta.lr, plan, base, tasks)


# ---- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(models: TaskModels, weights: dict[str, torch.Tensor], task: int, data: dict[str, torch.Tensor], batch: int,
             device: torch.device = torch.device("cpu")) -> float:
    """`models` and `weights` already on `device`; the data goes there a batch at a time."""
    correct, total = 0, int(data["labels"].shape[0])
    for start in range(0, total, batch):
        rows = {k: v[start : start + batch].to(device) for k, v in data.items()}
        predictions = models.logits(weights, task, rows).argmax(-1)
        correct += int((predictions == rows["labels"]).sum())
    return correct / total


def evaluate(models: TaskModels, plan: MergePlan, base: ModelCheckpoint, tasks: list[Checkpoint],
             datasets: list[dict[str, torch.Tensor]], merges: dict[str, dict[str, torch.Tensor]], batch: int,
             device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Per-task accuracy of the pretrained backbone, each individual model, then each named merge (labelled tasks),
    computed on `device` (one column's weights there at a time)."""
    rows: dict[str, dict[str, float]] = {}
    on = models.on(device)
    base_weights = {e.key: base.read(e.key).float() for e in plan.merged}
    for t, (ck, data) in enumerate(zip(tasks, datasets)):
        if "labels" not in data:
            continue
        own = {e.key: ck.read(e.sources[t]).float() for e in plan.merged}
        columns = {"pretrained": base_weights, "individual": own, **merges}
        rows[ck.name] = {name: round(accuracy(on, {k: v.to(device) for k, v in w.items()}, t, data, batch, device), 6)
                         for name, w in columns.items()}
    if rows:
        rows["average"] = {col: round(sum(r[col] for r in rows.values()) / len(rows), 6) for col in next(iter(rows.values()))}
    return rows


def evaluate_output(job: MergeJob, data: dict[str, Any], batch: int = 256, max_length: int = 128) -> dict[str, Any]:
    """`rankmerge eval`: accuracy of a published output (static or adaptive) next to pretrained and individual models."""
    device = resolve_device(job.device)
    with ExitStack() as stack:
        prepare_zero_shot_heads(job, device)
        base = stack.enter_context(ModelCheckpoint(job.base, "base", job.allow_pickle))
        tasks = open_tasks(job.sources, base, stack)
        merged_ck = stack.enter_context(ModelCheckpoint(job.output, "output"))
        plan = build_plan(base, {t.name: t for t in tasks})
        missing = sorted(set(job.models) - set(data))
        if missing:
            raise MergeInputError(f"no evaluation data for tasks {missing}", "give --data NAME=PATH for every task (or a tta.data block)")
        datasets = [load_task_data(data[ck.name], ck.name, job.base, max_length) for ck in tasks]
        models = build_task_models(plan, base, tasks)
        merged = {e.key: merged_ck.read(e.key).float() for e in plan.merged}
        return evaluate(models, plan, base, tasks, datasets, {"merged": merged}, batch, device)


# ---- the job ------------------------------------------------------------------------------------------------------
def compute_dtype(setting: str, plan: MergePlan) -> str:
    """`auto`: bfloat16 when every merged tensor is exported as bfloat16 — the entropy is then that of the exported
    model, and the workers' parameters, gradients and transfers halve — else float32."""
    if setting != "auto":
        return setting
    return "bfloat16" if all(e.out_dtype == torch.bfloat16 for e in plan.merged) else "float32"


def role_device(setting: str, gpus: float, role: str) -> str:
    """A Ray actor's device setting: a GPU reserved for it (resources.gpus_per_<role> > 0) is used unless the spec says
    `device: cpu`; a GPU asked for without one reserved is refused (Ray hides the GPUs from such an actor)."""
    if gpus > 0:
        return "cpu" if setting == "cpu" else "cuda"  # an actor sees only its own GPU(s): cuda:N means its first one
    if setting.startswith("cuda"):
        raise MergeInputError(f"device {setting!r} with --executor ray reserves no GPU for the {role}s",
                              f"set resources.gpus_per_{role}: 1 (or device: auto)")
    return "cpu"


def adaptive_work(job: MergeJob, plan: MergePlan, shards: int, output_kind: str = "classification",
                  teachers: Path | None = None, devices: tuple[str, str] = ("cpu", "cpu")) -> AdaptiveWork:
    """`output_kind`: the task models' output kind (workers/tta/adapters.py), which decides AdaRank's `vocab: auto`;
    `teachers`: the job's teacher-target cache (workers read it; the in-process worker gets the driver's rows);
    `devices`: the shards' and the workers' device settings."""
    params = parse_adaptive_params(job.method, job.params)
    factorized = params.method(MergeContext(tuple(plan.task_names), plan.merged_numel)).factorized
    columns = shard_columns(plan, shards, factorized)
    return AdaptiveWork(job.sources, params, job.tta.lr, dict(job.tta.data),
                        job.tta.max_length, columns, [[plan.merged[c].key for c in cols] for cols in columns],
                        len(plan.merged), job.resources.partition, compute_dtype(job.tta.compute_dtype, plan),
                        static_keys(params, plan, output_kind), Objective(job.tta.objective, job.tta.temperature), teachers,
                        *devices)


def start_executor(job: MergeJob, plan: MergePlan, executor: ExecutorName, address: str | None,
                   loaded: tuple[TaskModels, list[dict[str, torch.Tensor]]] | None = None,
                   teachers: Path | None = None) -> Executor:
    """`loaded`: the driver's task models and datasets, reused in-process by the local executor."""
    output_kind = loaded[0].output_kind if loaded is not None else "classification"
    if executor == "local":  # shard and worker share one device: the job's, resolved here
        device = str(resolve_device(job.device))
        return LocalExecutor(adaptive_work(job, plan, 1, output_kind, teachers, (device, device)), loaded=loaded)
    res = job.resources
    devices = (role_device(job.device, res.gpus_per_shard, "shard"), role_device(job.device, res.gpus_per_worker, "worker"))
    if devices[1] == "cuda" and res.workers > 1 and res.gpus_per_worker < 1:
        raise MergeInputError(f"{res.workers} workers with gpus_per_worker {res.gpus_per_worker:g} may be placed on one GPU, "
                              "and NCCL refuses two ranks on one GPU", "set resources.gpus_per_worker: 1, or workers: 1")
    from rankmerge.cluster.ray_executor import RayExecutor
    from rankmerge.cluster.ray_runtime import ensure_ray

    work = adaptive_work(job, plan, res.shards, output_kind, teachers, devices)
    ensure_ray(address, res.shards * res.cpus_per_shard + res.workers * res.cpus_per_worker,
               plan.merged_numel * work.dtype.itemsize)
    return RayExecutor(work, job.resolved_job_dir, res.workers, res.cpus_per_shard, res.cpus_per_worker,
                       res.gpus_per_shard, res.gpus_per_worker)


def dry_run_adaptive_job(job: MergeJob) -> str:
    """Every check a run makes, then the forecast of the in-process run (workers/tta/forecast.py); writes nothing."""
    tta, device = job.tta, resolve_device(job.device)
    with ExitStack() as stack:
        base, tasks, plan = open_inputs(job, stack, device)
        datasets = [load_task_data(tta.data[ck.name], ck.name, job.base, tta.max_length) for ck in tasks]
        check_adaptation_data(job, tasks, datasets)
        models = build_task_models(plan, base, tasks)
        params = parse_adaptive_params(job.method, job.params)
        dtype = getattr(torch, compute_dtype(tta.compute_dtype, plan))
        predicted = forecast_adaptive(plan, params, tta.lr, base, tasks, models, datasets, tta.batch_size, tta.steps,
                                      dtype, job.output.parent, device)
    counts = ", ".join(f"{n} {role}" for role, n in plan.role_counts().items())
    return "\n".join([
        f"architecture rules: {plan.rules.name}; tasks: {', '.join(plan.task_names)}",
        f"method: {job.method} {params.model_dump(by_alias=True)}",
        f"tensors: {counts}; merged entries per model: {plan.merged_numel:,}",
        f"adaptation: {tta.steps} steps, batch {tta.batch_size} per task, compute {dtype}".replace("torch.", ""),
        predicted.summary(),
        f"output: {job.output} (nothing written: dry run)",
    ])


def check_adaptation_data(job: MergeJob, tasks: list[Checkpoint], datasets: list[dict[str, torch.Tensor]]) -> None:
    """What the readers cannot see alone: too few rows for a batch, labels the task's head does not have, images of
    another size than the model's (adapted on interpolated position embeddings: allowed, but said)."""
    for ck, data in zip(tasks, datasets):
        rows = num_rows(data)
        if rows < job.tta.batch_size:
            raise MergeInputError(f"data for task {ck.name!r} has {rows} rows, fewer than tta.batch_size {job.tta.batch_size}",
                                  f"lower tta.batch_size to at most {rows}, or give more examples")
        classes = label_count(ck.config) if "labels" in data else 0
        low, high = (int(data["labels"].min()), int(data["labels"].max())) if classes else (0, 0)
        if low < 0 or high >= max(classes, 1):
            raise MergeInputError(f"data for task {ck.name!r} has labels in [{low}, {high}] but its model's head has "
                                  f"{classes} classes", "give labels 0..classes-1 in the head's order (or drop the labels: they only score)")
        size = (ck.config.get("vision_config") or ck.config).get("image_size")
        pixels = data.get("pixel_values")
        if pixels is not None and size and tuple(pixels.shape[-2:]) != (size, size):
            log.warning("task %r: images are %s, the model was trained on %dx%d; adapting with interpolated position "
                        "embeddings", ck.name, "x".join(map(str, pixels.shape[-2:])), size, size)


def prepare_teachers(job: MergeJob, plan: MergePlan, models: TaskModels, tasks: list[Checkpoint],
                     datasets: list[dict[str, torch.Tensor]], identity: str, device: torch.device) -> tuple[Path, float]:
    """Compute the teacher targets once per job on `device` (or reuse the job's intact cache of the same `identity`:
    spec and input fingerprints) and attach them to the datasets; returns the cache path and the seconds spent (0:
    reused)."""
    names, job_dir = [ck.name for ck in tasks], job.resolved_job_dir
    targets, seconds = load_teachers(job_dir, names, identity), 0.0
    if targets is None:
        started = time.perf_counter()
        dtype = getattr(torch, compute_dtype(job.tta.compute_dtype, plan))
        targets = teacher_targets(models, plan, tasks, datasets, job.tta.eval_batch_size, dtype, device)
        save_teachers(job_dir, names, targets, identity)
        seconds = time.perf_counter() - started
        log.info("teacher targets for %d tasks in %.1f s", len(names), seconds)
    for data, part in zip(datasets, targets):
        data.update(part)
    return job_dir / CACHE, seconds


def make_guard(runner: Executor, models: TaskModels, datasets: list[dict[str, torch.Tensor]], held: list[torch.Tensor],
               batch: int, device: torch.device) -> Guard:
    """Score the executor's current state on each task's held-out rows against the task model (no labels), on
    `device`."""
    references = [reference_labels({k: d[k] for k in TARGET_KEYS if k in d}) for d in datasets]
    on = models.on(device)

    @torch.no_grad()
    def score() -> list[dict[str, float]]:
        weights = {k: v.to(device) for k, v in collect_weights(runner, "final").items()}
        out = []
        for t, (data, rows, reference) in enumerate(zip(datasets, held, references)):
            tally = GuardTally()
            for part in torch.split(rows, batch):
                inputs = {k: v.to(device) for k, v in model_inputs(data, part).items()}
                tally.add(on.logits(weights, t, inputs), reference[part], on.valid(inputs))
            out.append(tally.signals())
        return out

    return score


def run_adaptive_job(job: MergeJob, resume: bool = False, executor: ExecutorName = "local", address: str | None = None,
                     restart: bool = False, strict: bool = False) -> dict[str, Any]:
    """`restart`: remove the job's checkpoints and start over; `strict`: refuse to publish (exit 2) when the last
    step is worse than step 0 by the label-free guard."""
    start_time = time.perf_counter()
    tta = job.tta
    # the driver's own model math (teacher targets, guard, evaluation): the job's device in-process; under Ray the
    # devices are the actors' and the driver stays on the CPU. An absent GPU is refused before any heavy work.
    where = resolve_device(job.device) if executor == "local" else torch.device("cpu")
    with ExitStack() as stack:
        lease = stack.enter_context(take_driver_lease(job))  # one driver per job dir, before any heavy work
        job_dir, spec_hash = job.resolved_job_dir, job.spec_hash()
        if not resume and any((job_dir / "checkpoints").glob("step_*")):  # before any heavy work
            if not restart:
                raise MergeInputError(f"{job_dir} already holds checkpoints of a run",
                                      "pass --resume to continue it, or --restart to start over (removes its checkpoints)")
            check_output_free(job.output, job.overwrite)  # a refused restart removes nothing
            log.warning("restart: removing the checkpoints in %s", job_dir)
            shutil.rmtree(job_dir / "checkpoints")
        base, tasks, plan = open_inputs(job, stack, where)
        datasets = [load_task_data(tta.data[ck.name], ck.name, job.base, tta.max_length) for ck in tasks]
        check_adaptation_data(job, tasks, datasets)
        spec_hash = job_identity(spec_hash, [base, *tasks], tta.data.values())  # --resume refuses replaced input files
        models = build_task_models(plan, base, tasks)  # checks the adapter before any actor starts
        splits = [holdout_split(num_rows(d), tta.holdout, tta.holdout_max_rows, tta.seed, ck.name) for ck, d in zip(tasks, datasets)]
        guarded = all(held.numel() > 0 for held, _ in splits)
        teachers, teacher_seconds = (prepare_teachers(job, plan, models, tasks, datasets, spec_hash, where)
                                     if guarded or tta.objective == "distill" else (None, 0.0))
        runner = start_executor(job, plan, executor, address, loaded=(models, datasets), teachers=teachers)
        stack.callback(runner.close)
        streams = [IndexStream(ck.name, num_rows(data), tta.seed, pool=pool if guarded else None)
                   for ck, data, (_, pool) in zip(tasks, datasets, splits)]
        guard = make_guard(runner, models, datasets, [held for held, _ in splits], tta.eval_batch_size, where) if guarded else None
        loop = LoopConfig(tta.steps, tta.batch_size, tta.checkpoint_every, tta.keep_checkpoints)
        coordinator = Coordinator(runner, streams, loop, job_dir, spec_hash, guard, lease)
        history = coordinator.run(resume)
        runner.stop_workers()  # the rest needs only the shards
        labelled = tta.evaluate and any("labels" in data for data in datasets)
        # unevaluated weights are only written: keep each in its output dtype as it arrives, not all of them in fp32
        out_dtypes = None if labelled else {e.key: e.out_dtype for e in plan.merged}
        merges: dict[str, dict[str, torch.Tensor]] = {}
        published, best = tta.steps, coordinator.best_state()
        if tta.select == "best" and best is not None and best[0] != tta.steps:
            if labelled:
                merges["last_step"] = collect_weights(runner, "final")
            runner.load_state({**runner.state(), **best[1]})
            published = best[0]
        final = collect_weights(runner, "final", out_dtypes)
        degraded = coordinator.track.degraded() if guard is not None else None
        if degraded is not None and strict:
            raise AdaptationDegraded(f"{job.method} ({tta.objective}) ended worse than its step-0 merge: {degraded}; nothing published",
                                     f"try tta.objective: distill, a lower tta.lr, or fewer steps (checkpoints kept in {job_dir})")
        if degraded is not None:
            log.warning("%s (%s) ended worse than its step-0 merge: %s; publishing step %d (tta.select: %s)",
                        job.method, tta.objective, degraded, published, tta.select)
        state = runner.state()
        report = {
            "method": job.method, "params": parse_adaptive_params(job.method, job.params).model_dump(by_alias=True),
            "tta": tta.model_dump(mode="json"), "transductive": True, "steps": tta.steps, "objective": tta.objective,
            "published_step": published, "executor": executor, "device": runner.device,
            "guard": {**coordinator.track.state(), "degraded": degraded, "heldout_rows": [int(h.numel()) for h, _ in splits]}
            if guard is not None else None,
            "resources": job.resources.model_dump() if executor == "ray" else None, "recoveries": coordinator.recoveries,
            "resumed_from_step": coordinator.resumed_from,
            "history": history, "learned_ranks": runner.learned_ranks(), "lambda": state["lambda"].tolist(),
            "timing": {"shard_build_seconds": round(runner.build_seconds, 3), "teacher_seconds": round(teacher_seconds, 3),
                       "step_seconds": coordinator.step_seconds, "bytes_per_step": runner.bytes_last_step},
        }
        if labelled:
            merges = {"initial": collect_weights(runner, "initial"), "merged": final, **merges}
            report["accuracy"] = evaluate(models, plan, base, tasks, datasets, merges, tta.eval_batch_size, where)
        lease.check()  # a replaced driver publishes nothing
        side_files = adaptive_files(runner.hard_masks(), runner.owners(), state["lambda"], plan)
        report = export(job, plan, base, tasks, side_files, final, report, start_time)
    return report


def collect_weights(runner: Executor, which: str, dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Every shard's `which` weights, one shard at a time, each cast to `dtypes` on arrival when given."""
    out: dict[str, torch.Tensor] = {}
    for part in runner.weights_by_shard(which):
        out.update({k: v.to(dtypes[k]) if dtypes else v for k, v in part.items()})
    return out


def adaptive_files(masks: dict[str, torch.Tensor], owners: dict[str, torch.Tensor], lam: torch.Tensor,
                   plan: MergePlan) -> dict[str, bytes]:
    """What was learned, beside the weights: hard masks, the owner of each mask entry (its λ row: task t in plan
    order, or T for components shared by every task), and λ with its columns named."""
    tasks = {"tasks": json.dumps(list(plan.task_names)), "shared_row": str(len(plan.task_names))}
    return {
        "adaptive/masks.safetensors": _safetensors({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}),
        "adaptive/owners.safetensors": _safetensors({k: v.to(torch.int64).contiguous() for k, v in owners.items()}, tasks),
        "adaptive/lambda.safetensors": save_safetensors({"lambda": lam.detach().contiguous()},
                                                        metadata={"columns": json.dumps([e.key for e in plan.merged])}),
    }


def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file; AdaMerging has no spectral tensor, and an empty file needs one placeholder entry."""
    return save_safetensors(tensors or {"none": torch.zeros(0)}, metadata=metadata)


def export(job: MergeJob, plan: MergePlan, base: ModelCheckpoint, tasks: list[Checkpoint], side_files: dict[str, bytes],
           final: dict[str, torch.Tensor], report: dict[str, Any], start_time: float) -> dict[str, Any]:
    """Publish the dense merged backbone (hard masks applied) with what was learned (`side_files`) beside it
    (workers/publish.py: the same path and report fields as a static merge); returns the full report."""
    ranks = {key: {"ranks": r} for key, r in report.get("learned_ranks", {}).items()}
    return publish(publication(job, plan, base, tasks, report["params"]), tensor_writer(plan, base, final), report,
                   start_time, side_files, ranks)
