"""AdaRank on real data: a tiny ViT pretrained on handwritten digits, four tasks genuinely fine-tuned from it.

The adaptation sees only the unlabeled test inputs (transductive, as in the paper); labels are read only to report
accuracy. Hyper-parameters are fixed here once, not chosen on test labels. Margins are several times what differs
between machines (the suite itself builds slightly differently on another CPU): distillation gained ~8 points over
its step-0 merge where these thresholds ask for 3, and the collapsing run falls ~45 points where they ask for 20.
"""

import json

import pytest
import yaml

from rankmerge.service.cli import main
from rankmerge.service.suites import build_digits_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return build_digits_suite(tmp_path_factory.mktemp("digits"), scale="test")


def run(suite, tmp_path, tta, *flags):
    spec = {
        "base": str(suite.base_dir),
        "models": {name: str(path) for name, path in suite.task_dirs.items()},
        "method": "adarank",
        "params": {"factorization": "ta", "lambda": 0.3},
        "output": str(tmp_path / "out"),
        "tta": {"data": {name: str(splits["test"]) for name, splits in suite.data.items()}, "batch_size": 32, **tta},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return main(["run", str(tmp_path / "job.yaml"), *flags])


def test_distilled_adarank_beats_its_step0_merge(suite, tmp_path):
    assert run(suite, tmp_path, {"steps": 100, "lr": 0.01, "checkpoint_every": 25}) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["objective"] == "distill"
    history = report["history"]
    first, last = sum(h["loss"] for h in history[:10]) / 10, sum(h["loss"] for h in history[-10:]) / 10
    assert last < 0.8 * first, f"summed distillation loss {first:.3f} -> {last:.3f}"
    accuracy = report["accuracy"]["average"]
    assert accuracy["merged"] > accuracy["initial"] + 0.03, accuracy  # initial == TA(λ0) exactly (AdaRank-TA at init)
    assert accuracy["merged"] <= accuracy["individual"] + 0.01
    assert sum(h["flips"] for h in history) > 0, "masks must have learned"
    assert report["guard"]["degraded"] is None and report["guard"]["curve"][-1]["score"] > report["guard"]["curve"][0]["score"]


COLLAPSING = {"objective": "entropy", "steps": 60, "lr": 0.2, "checkpoint_every": 20}  # entropy at a large lr


def test_a_collapsing_adaptation_is_caught_and_not_published_as_is(suite, tmp_path):
    assert run(suite, tmp_path, COLLAPSING) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    guard, accuracy = report["guard"], report["accuracy"]["average"]
    assert guard["degraded"], "the guard must say the last step is worse than step 0"
    assert report["published_step"] < 60 and guard["best_step"] == report["published_step"]
    assert accuracy["last_step"] < accuracy["initial"] - 0.2, accuracy  # it really collapsed (labels only score it)
    assert accuracy["merged"] >= accuracy["initial"] - 0.01, accuracy  # what was published did not


def test_strict_refuses_to_publish_a_degraded_adaptation(suite, tmp_path, capsys):
    assert run(suite, tmp_path, COLLAPSING, "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: adarank (entropy) ended worse than its step-0 merge"), err
    assert not (tmp_path / "out").exists()
    assert any((tmp_path / "out.job" / "checkpoints").glob("step_*")), "checkpoints are kept for inspection"
