"""AdaRank on real data: a tiny ViT pretrained on handwritten digits, four tasks genuinely fine-tuned from it.

The adaptation sees only the unlabeled test inputs (transductive, as in the paper); labels are read only to report
accuracy of the final step. Hyper-parameters are fixed here once (lr 0.01, 100 steps, batch 32, AdaRank-TA λ0 0.3),
not chosen on test labels.
"""

import json

import pytest
import yaml

from service.cli import main
from service.suites import build_digits_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return build_digits_suite(tmp_path_factory.mktemp("digits"), scale="test")


def test_adarank_lowers_entropy_and_beats_task_arithmetic(suite, tmp_path):
    spec = {
        "base": str(suite.base_dir),
        "models": {name: str(path) for name, path in suite.task_dirs.items()},
        "method": "adarank",
        "params": {"factorization": "ta", "lambda": 0.3},
        "output": str(tmp_path / "out"),
        "tta": {"data": {name: str(splits["test"]) for name, splits in suite.data.items()},
                "steps": 100, "lr": 0.01, "batch_size": 32, "checkpoint_every": 100},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    history = report["history"]
    first, last = sum(h["loss"] for h in history[:10]) / 10, sum(h["loss"] for h in history[-10:]) / 10
    assert last < 0.8 * first, f"summed entropy {first:.3f} -> {last:.3f}"
    accuracy = report["accuracy"]["average"]
    assert accuracy["merged"] > accuracy["initial"] + 0.005, accuracy  # initial == TA(λ0) exactly (AdaRank-TA at init)
    assert accuracy["merged"] <= accuracy["individual"] + 0.01
    assert sum(h["flips"] for h in history) > 0, "masks must have learned"
