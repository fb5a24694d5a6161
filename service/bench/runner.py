"""Run a list of methods on one suite through the ordinary job machinery and write one JSON record per method.

Every merge is a real job (a MergeJob spec, kept beside its output, run by run_merge_job / run_adaptive_job), so each
number in the table belongs to a safetensors output a user could load or re-create with `rankmerge run <spec>`.

Honesty (docs/METHODS.md §1, "honest evaluation"): a static method's grid is scored on the val split only; the test split is
read for the one chosen output, after the choice. Adaptive methods adapt on label-free copies of the inputs and report
their final step. The held-out protocol adapts on one seeded half of each task's test inputs and reports on the other.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from rankmerge.service.bench.data import ProtocolData, write_protocol_data
from rankmerge.service.bench.evaluate import Scores, SuiteEvaluator
from rankmerge.service.bench.grid import BenchMethod, TTASettings
from rankmerge.service.bench.layout import record_path, run_dir, write_json
from rankmerge.service.merge_job import run_merge_job
from rankmerge.service.spec import job_from_dict
from rankmerge.service.suites import Suite
from rankmerge.service.tta_job import run_adaptive_job

log = logging.getLogger(__name__)

SELECTION_CRITERION = "mean over tasks of val accuracy / individual model's val accuracy (normalized accuracy)"
REPORTED = ("test", "heldout")  # the splits every record reports; val only ever selects
PROTOCOLS = {  # protocol -> (data the adaptation reads, split the accuracy is reported on)
    "transductive": ("test inputs, labels removed", "test"),
    "heldout": ("seeded half of each task's test inputs, labels removed", "heldout"),
}


@dataclass
class BenchContext:
    """What every method's run shares: the suite, where results go, the protocol data and one evaluator."""

    suite_name: str
    suite: Suite
    results: Path
    data: ProtocolData
    evaluator: SuiteEvaluator
    tta: TTASettings
    seed: int
    _references: dict[str, dict[str, Scores]] = field(default_factory=dict)

    def references(self, split: str) -> dict[str, Scores]:
        if split not in self._references:
            self._references[split] = self.evaluator.references(split)
        return self._references[split]

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.results))


def _run_job(ctx: BenchContext, method: str, params: dict[str, Any], output: Path, tta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the job spec beside its output, then run it exactly as `rankmerge run <spec>` would."""
    spec: dict[str, Any] = {"base": str(ctx.suite.base_dir), "models": {t: str(p) for t, p in ctx.suite.task_dirs.items()},
                            "method": method, "params": params, "output": str(output), "overwrite": True}
    if tta is not None:
        spec["tta"] = tta
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    job = job_from_dict(spec, output.parent)
    return run_adaptive_job(job) if job.adaptive else run_merge_job(job)


def score_reported(ctx: BenchContext, output: Path) -> dict[str, Scores]:
    return {split: ctx.evaluator.score(output, split) for split in REPORTED}


def mean_scores(runs: list[Scores]) -> Scores:
    return {task: round(sum(r[task] for r in runs) / len(runs), 6) for task in runs[0]}


def normalized_accuracy(scores: Scores, individual: Scores) -> float:
    tasks = [t for t in scores if t != "average"]
    return round(sum(scores[t] / individual[t] for t in tasks) / len(tasks), 6)


def run_reference(ctx: BenchContext, method: BenchMethod) -> dict[str, Any]:
    """Pretrained backbone (with each task's head) and the individual fine-tuned models."""
    return {"accuracy": {split: ctx.references(split)[method.name] for split in REPORTED}}


def run_static(ctx: BenchContext, method: BenchMethod) -> dict[str, Any]:
    """Merge every grid point, score each on val, keep the best; only the chosen output is ever scored on test."""
    folder = run_dir(ctx.results, method.name) / "candidates"
    individual_val = ctx.references("val")["individual"]
    candidates = []
    for i, params in enumerate(method.candidates()):
        output = folder / f"{i:03d}"
        _run_job(ctx, method.method, params, output)
        val = ctx.evaluator.score(output, "val")
        candidates.append({"params": params, "val": val, "score": normalized_accuracy(val, individual_val), "output": output})
    best = max(range(len(candidates)), key=lambda i: candidates[i]["score"])  # the first of equal scores wins
    chosen = candidates[best]["output"]
    for candidate in candidates:  # only the chosen output (and its spec) is kept
        output = candidate.pop("output")
        if output != chosen:
            shutil.rmtree(output, ignore_errors=True)
            output.with_suffix(".yaml").unlink(missing_ok=True)
    record = {
        "params": candidates[best]["params"],
        "selection": {"split": "val", "criterion": SELECTION_CRITERION, "chosen": best, "candidates": candidates},
        "output": ctx.relative(chosen), "job": ctx.relative(chosen.with_suffix(".yaml")),
        "accuracy": score_reported(ctx, chosen),
    }
    if method.seeds:
        record.update(seed_average(ctx, method, record["params"], record["accuracy"]))
    return record


def seed_average(ctx: BenchContext, method: BenchMethod, params: dict[str, Any], first: dict[str, Scores]) -> dict[str, Any]:
    """Re-run the val-chosen parameters with more seeds; the reported accuracy is the mean over all seeds."""
    runs = {params["seed"]: first}
    for seed in method.seeds:
        output = run_dir(ctx.results, method.name) / "seeds" / f"seed{seed}"
        _run_job(ctx, method.method, {**params, "seed": seed}, output)
        runs[seed] = score_reported(ctx, output)
    return {"accuracy": {split: mean_scores([r[split] for r in runs.values()]) for split in REPORTED},
            "seed_runs": {str(seed): scores for seed, scores in runs.items()}}


def run_adaptive(ctx: BenchContext, method: BenchMethod) -> dict[str, Any]:
    """Both protocols from the paper's initial parameters; the published step is the final one (`select: final`) or
    the label-free guard's best (held-out agreement with the task models); no label is read."""
    folder = run_dir(ctx.results, method.name)
    adapt_data = {"transductive": ctx.data.test_inputs, "heldout": ctx.data.adapt}
    protocols, accuracy, record = {}, {}, {}
    if method.initial is not None:  # the static job equal to the model at step 0: where the adaptation started
        static, params = method.initial
        _run_job(ctx, static, params, folder / "step0")
        record["initial"] = {"method": static, "params": params, "output": ctx.relative(folder / "step0"),
                             "accuracy": score_reported(ctx, folder / "step0")}
    for protocol, (adapt_on, split) in PROTOCOLS.items():
        start = time.perf_counter()
        output = folder / protocol
        tta = {"data": {t: str(p) for t, p in adapt_data[protocol].items()}, "steps": ctx.tta.steps, "lr": ctx.tta.lr,
               "batch_size": ctx.tta.batch_size, "seed": ctx.seed, "checkpoint_every": max(ctx.tta.steps // 10, 1),
               "keep_checkpoints": 1, "evaluate": False, **method.tta}
        report = _run_job(ctx, method.method, method.fixed, output, tta)
        accuracy[split] = ctx.evaluator.score(output, split)
        history = report["history"]
        protocols[protocol] = {
            "adapt_on": adapt_on, "report_on": split, "output": ctx.relative(output), "job": ctx.relative(output.with_suffix(".yaml")),
            "loss": {"first": history[0]["loss"], "last": history[-1]["loss"]}, "mask_flips": sum(h["flips"] for h in history),
            "objective": report["objective"], "published_step": report["published_step"], "guard": report["guard"],
            "wall_seconds": round(time.perf_counter() - start, 3),
        }
    return {**record, "params": method.fixed, "resolved_params": report["params"],
            "tta": {"steps": ctx.tta.steps, "lr": ctx.tta.lr, "batch_size": ctx.tta.batch_size},
            "selection": {"split": None, "criterion": "the paper's initial parameters; final step, or the label-free "
                                                      "guard's best state (tta.select)"},
            "protocols": protocols, "accuracy": accuracy}


RUNNERS: dict[str, Callable[[BenchContext, BenchMethod], dict[str, Any]]] = {
    "reference": run_reference, "static": run_static, "adaptive": run_adaptive,
}


class _OncePerMessage(logging.Filter):
    """Pass each distinct message once: ~150 merges of one suite would repeat the same plan warnings 150 times."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextmanager
def _quiet_repeats(*names: str) -> Iterator[None]:
    once = _OncePerMessage()
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addFilter(once)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(once)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_methods(suite_name: str, suite: Suite, results: Path, methods: list[BenchMethod], tta: TTASettings,
                seed: int = 0, threads: int = 1) -> list[dict[str, Any]]:
    """Run each method (fresh run folder each time), write its record, log one line per finished method."""
    results.mkdir(parents=True, exist_ok=True)
    records = []
    with torch_threads(threads), _quiet_repeats("rankmerge.workers.plan"), logging_redirect_tqdm():
        data = write_protocol_data(suite, results / "data", seed)
        splits = {"val": {t: s["val"] for t, s in suite.data.items()}, "test": {t: s["test"] for t, s in suite.data.items()},
                  "heldout": data.report}
        with SuiteEvaluator(suite, splits) as evaluator:
            ctx = BenchContext(suite_name, suite, results, data, evaluator, tta, seed)
            for method in tqdm(methods, desc=f"bench {suite_name}", unit="method"):
                start = time.perf_counter()
                shutil.rmtree(run_dir(results, method.name), ignore_errors=True)
                record = {"method": method.name, "label": method.label, "group": method.group, "kind": method.kind,
                          "job_method": method.method or None, "suite": suite_name, "seed": seed,
                          "heldout_split": {"seed": seed, "sizes": data.sizes},
                          **RUNNERS[method.kind](ctx, method)}
                record["wall_seconds"] = round(time.perf_counter() - start, 3)
                write_json(record_path(results, method.name), record)
                acc = record["accuracy"]
                log.info("%-16s test %.4f  held-out %.4f  %7.1f s  %s", method.name, acc["test"]["average"],
                         acc["heldout"]["average"], record["wall_seconds"], record.get("params") or "")
                records.append(record)
    return records
