"""Per-task accuracy of published outputs on named splits, with the suite's checkpoints and task models opened once.

`rankmerge eval` (rankmerge.service.tta_job.evaluate_output) re-opens every input and re-scores the pretrained and individual
models on each call; a benchmark scores ~150 outputs, so it opens once and scores only the output each time — with the
same `accuracy` and `evaluate` functions, so the numbers are the ones a user would get.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

from rankmerge.service.suites import Suite
from rankmerge.service.tta_job import accuracy, evaluate
from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.plan import build_plan
from rankmerge.workers.tta.adapters import build_task_models
from rankmerge.workers.tta.data import load_task_data

Scores = dict[str, float]  # task -> accuracy, plus "average"


def with_average(scores: Scores) -> Scores:
    return {**scores, "average": round(sum(scores.values()) / len(scores), 6)}


class SuiteEvaluator:
    """Score outputs of jobs over the suite's base and task models on labelled splits (split name -> task -> file)."""

    def __init__(self, suite: Suite, splits: dict[str, dict[str, Path]], batch: int = 256, max_length: int = 128) -> None:
        self.suite, self.batch = suite, batch
        self._stack = ExitStack()
        try:
            self.base = self._stack.enter_context(ModelCheckpoint(suite.base_dir, "base"))
            self.tasks = [self._stack.enter_context(ModelCheckpoint(path, name)) for name, path in suite.task_dirs.items()]
            self.plan = build_plan(self.base, {ck.name: ck for ck in self.tasks})
            self.models = build_task_models(self.plan, self.base, self.tasks)
            self.data = {split: [load_task_data(files[ck.name], ck.name, suite.base_dir, max_length) for ck in self.tasks]
                         for split, files in splits.items()}
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "SuiteEvaluator":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stack.close()

    def references(self, split: str) -> dict[str, Scores]:
        """{"pretrained": scores, "individual": scores} on the split."""
        rows = evaluate(self.models, self.plan, self.base, self.tasks, self.data[split], {}, self.batch)
        rows.pop("average", None)
        return {column: with_average({task: row[column] for task, row in rows.items()}) for column in ("pretrained", "individual")}

    def score(self, output: Path, split: str) -> Scores:
        """Accuracy per task of the merged backbone published in `output` (each task through its own head)."""
        with ModelCheckpoint(output, "output") as merged_ck:
            weights = {e.key: merged_ck.read(e.key).float() for e in self.plan.merged}
        return with_average({ck.name: round(accuracy(self.models, weights, t, data, self.batch), 6)
                             for t, (ck, data) in enumerate(zip(self.tasks, self.data[split]))})
