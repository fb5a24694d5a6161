"""The real-data digits suite: file contract, determinism, and the accuracy gaps it exists to provide.

Accuracies are recomputed here with plain torch/transformers (no rankmerge merge code), including task arithmetic.
"""

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from transformers import ViTForImageClassification, ViTModel

from rankmerge.service.suites import build_digits_suite

pytestmark = pytest.mark.slow  # two ~9 s builds (the second checks determinism)

SPLITS = ("train", "val", "test")
LAMBDA = 0.3


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return build_digits_suite(tmp_path_factory.mktemp("digits"), scale="test", seed=0)


def _accuracy(model: torch.nn.Module, data_file) -> float:
    data = load_file(str(data_file))
    with torch.no_grad():
        return float((model.eval()(pixel_values=data["pixel_values"]).logits.argmax(-1) == data["labels"]).float().mean())


def _with_backbone(task_dir, backbone: dict[str, torch.Tensor], workdir) -> ViTForImageClassification:
    """The task model (its own head) with another `vit.*` backbone swapped in, through the files: transformers 5
    renames ViT modules in memory (layers.N.attention.q_proj) but keeps the on-disk names that the suite's files use."""
    tensors = load_file(str(task_dir / "model.safetensors"))
    assert set(backbone) == {k for k in tensors if k.startswith("vit.")}
    workdir.mkdir(parents=True)
    shutil.copy(task_dir / "config.json", workdir)
    save_file({**tensors, **backbone}, str(workdir / "model.safetensors"), metadata={"format": "pt"})
    return ViTForImageClassification.from_pretrained(workdir)


def _task_arithmetic(suite, lam: float) -> dict[str, torch.Tensor]:
    """θ0 + λ Σ_t (θ_t − θ0) over every backbone tensor (the base's pooler is used by no task)."""
    base = load_file(str(suite.base_dir / "model.safetensors"))
    tasks = [load_file(str(d / "model.safetensors")) for d in suite.task_dirs.values()]
    keys = [k for k in tasks[0] if k.startswith("vit.")]
    return {k: base[k[4:]] + lam * sum(t[k] - base[k[4:]] for t in tasks) for k in keys}


@pytest.fixture(scope="module")
def accuracies(suite, tmp_path_factory):
    """Test accuracy per task: pretrained backbone + the task's head, the fine-tuned model, task arithmetic."""
    base = {f"vit.{k}": v for k, v in load_file(str(suite.base_dir / "model.safetensors")).items() if not k.startswith("pooler.")}
    merged = _task_arithmetic(suite, LAMBDA)
    out, workdir = {}, tmp_path_factory.mktemp("swapped")
    for task, task_dir in suite.task_dirs.items():
        test = suite.data[task]["test"]
        out[task] = {"pretrained": _accuracy(_with_backbone(task_dir, base, workdir / task / "pretrained"), test),
                     "finetuned": _accuracy(ViTForImageClassification.from_pretrained(task_dir), test),
                     "ta": _accuracy(_with_backbone(task_dir, merged, workdir / task / "ta"), test)}
    return out


def test_files_follow_the_contract(suite):
    manifest = suite.manifest
    assert (manifest["scale"], manifest["seed"]) == ("test", 0)
    assert len(suite.task_dirs) >= 4 and set(manifest["tasks"]) == set(suite.task_dirs) == set(suite.data)
    assert isinstance(ViTModel.from_pretrained(suite.base_dir), ViTModel)
    for task, task_dir in suite.task_dirs.items():
        num_labels = manifest["tasks"][task]["num_labels"]
        model = ViTForImageClassification.from_pretrained(task_dir)
        assert model.config.num_labels == num_labels and (task_dir / "model.safetensors").is_file()
        assert all(k.startswith(("vit.", "classifier.")) and "pooler" not in k for k in load_file(str(task_dir / "model.safetensors")))
        for split in SPLITS:
            data = load_file(str(suite.data[task][split]))
            x, y = data["pixel_values"], data["labels"]
            assert set(data) == {"pixel_values", "labels"}
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            n = manifest["split_sizes"][split]
            assert x.shape == (n, 1, 8, 8) and y.shape == (n,)
            assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
            assert 0 <= int(y.min()) and int(y.max()) < num_labels
        assert set(load_file(str(suite.data[task]["train"]))["labels"].tolist()) == set(range(num_labels))


def test_splits_are_disjoint_real_digits(suite):
    idx = {s: suite.manifest["split_indices"][s] for s in SPLITS}
    assert sum(len(v) for v in idx.values()) == 1797 and set().union(*map(set, idx.values())) == set(range(1797))
    raw = load_digits()
    images, digits = torch.tensor(raw.images, dtype=torch.float32) / 16, torch.as_tensor(raw.target)
    test = torch.tensor(idx["test"])
    expected = {"digits": (lambda im: im, lambda d: d),
                "parity_rot90": (lambda im: torch.rot90(im, 1, (-2, -1)), lambda d: d % 2),
                "high_inverted": (lambda im: 1 - im, lambda d: (d >= 5).long()),
                "mod3_flipped": (lambda im: im.flip(-1), lambda d: d % 3)}
    for task, (view, label) in expected.items():
        data = load_file(str(suite.data[task]["test"]))
        assert torch.allclose(data["pixel_values"][:, 0], (view(images[test]) - 0.5) / 0.5)
        assert torch.equal(data["labels"], label(digits[test]))


def test_rebuild_is_identical_and_reuse_is_free(suite, tmp_path):
    def digests(root):
        return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    before = digests(suite.root)
    again = build_digits_suite(tmp_path, scale="test", seed=0)
    assert digests(again.root) == before
    mtime = (suite.root / "suite.json").stat().st_mtime_ns
    assert build_digits_suite(suite.root, scale="test", seed=0) == suite
    assert (suite.root / "suite.json").stat().st_mtime_ns == mtime and digests(suite.root) == before
    with pytest.raises(ValueError, match="unknown scale"):
        build_digits_suite(tmp_path, scale="huge")


def test_manifest_accuracies_are_the_real_ones(suite, accuracies):
    for task, acc in suite.manifest["tasks"].items():
        assert acc["accuracy"]["finetuned"]["test"] == pytest.approx(accuracies[task]["finetuned"], abs=1e-3)
        assert acc["accuracy"]["pretrained_head"]["test"] == pytest.approx(accuracies[task]["pretrained"], abs=1e-3)


def test_every_fine_tune_beats_pretrained_plus_head(accuracies):
    # measured (seed 0): gains of 0.11-0.15 on every task, fine-tuned 0.93-0.97
    for task, acc in accuracies.items():
        assert acc["finetuned"] >= 0.9 and acc["finetuned"] >= acc["pretrained"] + 0.08, (task, acc)


def test_task_arithmetic_leaves_a_merging_gap(accuracies):
    # measured (seed 0): mean fine-tuned 0.957, task arithmetic 0.822
    mean = {k: sum(a[k] for a in accuracies.values()) / len(accuracies) for k in ("pretrained", "finetuned", "ta")}
    assert mean["ta"] <= mean["finetuned"] - 0.08, mean
