"""The vision-smoke suite (scikit-learn digits + glyphs of the core DejaVu fonts, no apt install): the file contract,
reuse, loadability with plain transformers, real fine-tuning gains, disjoint splits, and one adaptive merge through
the real CLI that shows the merging gap. The 8/14/20-task suites share all of this code at a larger scale.
"""

import hashlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import ViTForImageClassification, ViTModel

from rankmerge.service.cli import main
from rankmerge.service.suites import SUITES
from rankmerge.service.suites.image_sources import FontGroup, find_fonts, load_fashion_mnist
from rankmerge.service.suites.vision import FORMAT, IMAGE_SIZE, build_vision_suite
from rankmerge.service.suites.vision_catalog import SUITES as VISION_SUITES
from rankmerge.service.suites.vision_catalog import TASKS
from rankmerge.workers.errors import MergeInputError

pytestmark = pytest.mark.slow  # one ~20 s build (2 free cores) and a short AdaRank run

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def suite(vision_smoke_suite):
    return vision_smoke_suite


def _data(suite, task, split):
    data = load_file(str(suite.data[task][split]))
    return data["pixel_values"], data["labels"]


def test_files_and_manifest(suite):
    manifest = suite.manifest
    assert (manifest["format"], manifest["suite"], manifest["seed"]) == (FORMAT, "vision-smoke", 0)
    assert list(manifest["tasks"]) == VISION_SUITES["vision-smoke"][1] == list(suite.task_dirs)
    assert manifest["build_seconds"] > 0 and manifest["derived_tasks"] == 0
    assert manifest["pretraining"]["train_accuracy"] > 0.4  # the backbone really learned its pretraining mixture
    for task, record in manifest["tasks"].items():
        for split in SPLITS:
            x, y = _data(suite, task, split)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape == (record["split_sizes"][split], 1, IMAGE_SIZE, IMAGE_SIZE) and y.shape == x.shape[:1]
            assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.1
            assert set(y.tolist()) == set(range(record["num_labels"]))  # every class in every split


def test_a_second_build_reuses_the_files(suite):
    def stamps(root):
        return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}

    before = stamps(suite.root)
    assert build_vision_suite(suite.root, suite="vision-smoke") == suite
    assert stamps(suite.root) == before
    with pytest.raises(ValueError, match="unknown vision suite"):
        build_vision_suite(suite.root, suite="vision3")


def test_models_load_and_the_manifest_accuracies_are_real(suite):
    assert isinstance(ViTModel.from_pretrained(suite.base_dir), ViTModel)
    for task, record in suite.manifest["tasks"].items():
        model = ViTForImageClassification.from_pretrained(suite.task_dirs[task]).eval()
        assert [model.config.id2label[i] for i in range(record["num_labels"])] == record["labels"]
        x, y = _data(suite, task, "test")
        with torch.no_grad():
            acc = float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())
        assert acc == pytest.approx(record["accuracy"]["finetuned"]["test"], abs=1e-3)


def test_fine_tuning_beats_the_pretrained_probe(suite):
    # measured (seed 0): digits .86 -> .96, font_digits .75 -> .83, upper .46 -> .68
    for task, record in suite.manifest["tasks"].items():
        acc = record["accuracy"]
        assert acc["finetuned"]["test"] >= acc["pretrained_head"]["test"] + 0.06, (task, acc)


def test_splits_are_disjoint(suite):
    manifest = suite.manifest
    for task in suite.task_dirs:
        rows = {s: {hashlib.sha256(r.numpy().tobytes()).digest() for r in _data(suite, task, s)[0]} for s in SPLITS}
        assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
        fonts = manifest["tasks"][task].get("fonts")
        if fonts:  # rendered tasks: a test font is never a train or val font
            assert all(fonts[s] for s in SPLITS) and not set(fonts["test"]) & (set(fonts["train"]) | set(fonts["val"]))
            assert not set(manifest["pretraining"]["fonts"]) & (set(fonts["val"]) | set(fonts["test"]))


def test_adarank_through_the_cli_shows_a_merging_gap(suite, tmp_path):
    spec = {"base": str(suite.base_dir), "models": {t: str(d) for t, d in suite.task_dirs.items()},
            "method": "adarank", "params": {"factorization": "ta", "lambda": 0.3}, "output": str(tmp_path / "out"),
            "tta": {"data": {t: str(s["test"]) for t, s in suite.data.items()}, "steps": 4, "batch_size": 32,
                    "checkpoint_every": 4}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    average = json.loads((tmp_path / "out" / "merge_report.json").read_text())["accuracy"]["average"]
    # measured (seed 0): pretrained .69, individual .82, task arithmetic (AdaRank's step 0) .68
    assert average["individual"] >= average["pretrained"] + 0.05, average
    assert average["initial"] <= average["individual"] - 0.05, average


def test_missing_sources_name_the_install_command(tmp_path):
    with pytest.raises(MergeInputError, match=r"apt-get update && apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    group = FontGroup("nowhere", "sans", "test", "fonts-nowhere", ("NoSuchFont-*.ttf",))
    with pytest.raises(MergeInputError, match=r"apt-get install -y fonts-nowhere"):
        find_fonts([group])


def test_suite_catalog_is_nested_and_mostly_real():
    names = [VISION_SUITES[s][1] for s in ("vision8", "vision14", "vision20")]
    assert [len(n) for n in names] == [8, 14, 20] and names[0] == names[1][:8] and names[1] == names[2][:14]
    for tasks in names:
        assert 3 * sum(TASKS[t].derived for t in tasks) <= len(tasks)
    assert {"vision-smoke", "vision8", "vision14", "vision20"} <= set(SUITES)
