"""Run an adaptive (AdaRank / AdaMerging) job in-process: build the state, adapt with checkpoints, export, evaluate.

Resume: the loop state is λ, mask logits, Adam state and the per-task data cursors; nothing is random besides the
data order (seeded by cursor), so resuming from a checkpoint reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from cluster.checkpoints import load_latest_checkpoint, save_checkpoint
from service.merge_job import open_inputs
from service.spec import MergeJob, parse_adaptive_params
from workers.checkpoint_reader import ModelCheckpoint
from workers.checkpoint_writer import StreamingCheckpointWriter, parse_size
from workers.errors import MergeInputError
from workers.plan import MergePlan, build_plan
from workers.static_merge import peak_rss_bytes, write_heads, write_weights
from workers.tta.adapters import TaskModels, build_task_models
from workers.tta.data import TaskStream, load_task_data
from workers.tta.engine import AdaptiveMerger, AdaptiveOptions
from workers.tta.params import AdaMergingParams, AdaRankParams
from workers.tta.state import build_state

log = logging.getLogger(__name__)


def build_merger(job: MergeJob, plan: MergePlan, base: ModelCheckpoint, tasks: list[ModelCheckpoint]) -> AdaptiveMerger:
    params = parse_adaptive_params(job.method, job.params)
    if isinstance(params, AdaRankParams):
        slots, lam = build_state(plan, base, tasks, params.factorization, params.initial_lambda(), params.rho,
                                 params.common_fraction, params.mask_range, params.max_rank, getattr(torch, params.factor_dtype))
        options = AdaptiveOptions(params.temperature, params.learn_lambda, params.learn_masks, None, job.tta.lr, params.cache_masked)
    else:
        assert isinstance(params, AdaMergingParams)
        slots, lam = build_state(plan, base, tasks, "none", params.lambda_)
        options = AdaptiveOptions(learn_lambda=True, learn_masks=False, clamp=(0.0, 1.0) if params.clamp else None, lr=job.tta.lr)
    return AdaptiveMerger(slots, lam, options)


# ---- checkpoint state ---------------------------------------------------------------------------------------------
def state_tensors(merger: AdaptiveMerger) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"lambda": merger.lam.detach()}
    tensors.update({f"mask/{k}": v.detach() for k, v in merger.logits.items()})
    opt = merger.optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"adam/{index}/{name}"] = value
    return tensors, {"param_groups": opt["param_groups"]}


def restore_state(merger: AdaptiveMerger, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with torch.no_grad():
        merger.lam.copy_(tensors["lambda"])
        for key, logits in merger.logits.items():
            logits.copy_(tensors[f"mask/{key}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("adam/"):
            _, index, field = name.split("/", 2)
            state.setdefault(int(index), {})[field] = value
    merger.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---- evaluation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(models: TaskModels, weights: dict[str, torch.Tensor], task: int, data: dict[str, torch.Tensor], batch: int) -> float:
    correct, total = 0, int(data["labels"].shape[0])
    for start in range(0, total, batch):
        rows = {k: v[start : start + batch] for k, v in data.items()}
        predictions = models.logits(weights, task, rows).argmax(-1)
        correct += int((predictions == rows["labels"]).sum())
    return correct / total


def evaluate(models: TaskModels, plan: MergePlan, base: ModelCheckpoint, tasks: list[ModelCheckpoint],
             datasets: list[dict[str, torch.Tensor]], merges: dict[str, dict[str, torch.Tensor]], batch: int) -> dict[str, Any]:
    """Per-task accuracy of the pretrained backbone, each individual model, then each named merge (labelled tasks)."""
    rows: dict[str, dict[str, float]] = {}
    base_weights = {e.key: base.read(e.key).float() for e in plan.merged}
    for t, (ck, data) in enumerate(zip(tasks, datasets)):
        if "labels" not in data:
            continue
        own = {e.key: ck.read(e.sources[t]).float() for e in plan.merged}
        columns = {"pretrained": base_weights, "individual": own, **merges}
        rows[ck.name] = {name: round(accuracy(models, w, t, data, batch), 6) for name, w in columns.items()}
    if rows:
        rows["average"] = {col: round(sum(r[col] for r in rows.values()) / len(rows), 6) for col in next(iter(rows.values()))}
    return rows


def evaluate_output(job: MergeJob, data: dict[str, Any], batch: int = 256, max_length: int = 128) -> dict[str, Any]:
    """`rankmerge eval`: accuracy of a published output (static or adaptive) next to pretrained and individual models."""
    with ExitStack() as stack:
        base = stack.enter_context(ModelCheckpoint(job.base, "base", job.allow_pickle))
        tasks = [stack.enter_context(ModelCheckpoint(path, name, job.allow_pickle)) for name, path in job.models.items()]
        merged_ck = stack.enter_context(ModelCheckpoint(job.output, "output"))
        plan = build_plan(base, {t.name: t for t in tasks})
        missing = sorted(set(job.models) - set(data))
        if missing:
            raise MergeInputError(f"no evaluation data for tasks {missing}", "give --data NAME=PATH for every task (or a tta.data block)")
        datasets = [load_task_data(data[ck.name], ck.name, job.base, max_length) for ck in tasks]
        models = build_task_models(plan, base, tasks)
        merged = {e.key: merged_ck.read(e.key).float() for e in plan.merged}
        return evaluate(models, plan, base, tasks, datasets, {"merged": merged}, batch)


# ---- the job ------------------------------------------------------------------------------------------------------
def run_adaptive_job(job: MergeJob, resume: bool = False) -> dict[str, Any]:
    start_time = time.perf_counter()
    tta = job.tta
    with ExitStack() as stack:
        job_dir, spec_hash = job.resolved_job_dir, job.spec_hash()
        if not resume and any((job_dir / "checkpoints").glob("step_*")):  # before any heavy work
            raise MergeInputError(f"{job_dir} already holds checkpoints of a run", "pass --resume to continue it, or remove the job_dir")
        base, tasks, plan = open_inputs(job, stack)
        datasets = [load_task_data(tta.data[ck.name], ck.name, job.base, tta.max_length) for ck in tasks]
        models = build_task_models(plan, base, tasks)
        found = load_latest_checkpoint(job_dir, spec_hash) if resume else None
        merger = build_merger(job, plan, base, tasks)
        streams = [TaskStream(ck.name, data, tta.seed) for ck, data in zip(tasks, datasets)]
        step = 0
        if found is not None:
            tensors, meta = found
            restore_state(merger, tensors, meta)
            for stream, cursor in zip(streams, meta["cursors"]):
                stream.load_state(cursor)
            step = int(meta["step"])
            log.info("resumed %s at step %d", job_dir, step)
        history = _adapt(merger, models, streams, tta, step, job_dir, spec_hash)
        final = merger.final_weights()
        report = {
            "method": job.method, "params": parse_adaptive_params(job.method, job.params).model_dump(by_alias=True),
            "tta": tta.model_dump(mode="json"), "transductive": True, "steps": tta.steps,
            "history": history, "learned_ranks": merger.learned_ranks(), "lambda": merger.lam.detach().tolist(),
        }
        if tta.evaluate:
            report["accuracy"] = evaluate(models, plan, base, tasks, datasets, {"initial": merger.initial_weights(), "merged": final}, tta.eval_batch_size)
        export(job, plan, base, tasks, merger, final, report, start_time)
    return report


def _adapt(merger: AdaptiveMerger, models: TaskModels, streams: list[TaskStream], tta, start: int, job_dir, spec_hash: str) -> list[dict[str, Any]]:
    history = []
    with tqdm(total=tta.steps, initial=start, desc="adapt", disable=None) as bar:
        for step in range(start, tta.steps):
            batches = [s.next_batch(tta.batch_size) for s in streams]

            def loss_fn(weights):
                per_task = [models.entropy(weights, t, b) for t, b in enumerate(batches)]
                return torch.stack(per_task).sum(), [float(x.detach()) for x in per_task]

            loss, per_task, flips = merger.step(loss_fn)
            history.append({"step": step + 1, "loss": round(loss, 6), "flips": flips})
            bar.set_postfix(loss=f"{loss:.4f}", flips=flips)
            bar.update(1)
            if (step + 1) % tta.checkpoint_every == 0 or step + 1 == tta.steps:
                tensors, meta = state_tensors(merger)
                meta.update({"spec_hash": spec_hash, "cursors": [s.state() for s in streams]})
                save_checkpoint(job_dir, step + 1, tensors, meta, tta.keep_checkpoints)
    return history


def export(job: MergeJob, plan: MergePlan, base: ModelCheckpoint, tasks: list[ModelCheckpoint], merger: AdaptiveMerger,
           final: dict[str, torch.Tensor], report: dict[str, Any], start_time: float) -> None:
    """Dense merged backbone (hard masks applied), per-task heads, learned masks and λ, report — published atomically."""
    with StreamingCheckpointWriter(job.output, plan.layout(), parse_size(job.max_shard_size), job.overwrite) as writer:
        write_weights(writer, plan, base, final)
        report["heads"] = write_heads(writer, plan, tasks)
        writer.copy_side_files(base.path)
        masks = {k: v.to(torch.uint8) for k, v in merger.hard_masks().items()}
        writer.write_side_file("adaptive/masks.safetensors", save_safetensors(masks) if masks else save_safetensors({"none": torch.zeros(0)}))
        writer.write_side_file("adaptive/lambda.safetensors", save_safetensors({"lambda": merger.lam.detach().contiguous()},
                                                                              metadata={"columns": json.dumps([s.key for s in merger.slots])}))
        report["wall_seconds"] = round(time.perf_counter() - start_time, 3)
        report["peak_rss_bytes"] = peak_rss_bytes()
        writer.write_side_file("merge_report.json", (json.dumps(report, indent=2) + "\n").encode())
