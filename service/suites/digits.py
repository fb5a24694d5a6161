"""A real-data vision suite from scikit-learn's handwritten digits (1,797 8×8 images, offline): one pretrained ViT
backbone and one genuinely fine-tuned ViTForImageClassification per task, plus each task's preprocessed data.

Why these tasks: each one sees the digits through a different transform AND asks a different question of them —
`digits` (the digit, upright), `parity_rot90` (even/odd, rotated 90°), `high_inverted` (digit ≥ 5, intensity
inverted) and `mod3_flipped` (digit mod 3, mirrored). Fine-tuning specialises the one shared encoder to one view and
one partition of the ten digit clusters, so the task vectors pull the same weights in different directions and plain
task arithmetic loses accuracy against the individual models: a real gap for adaptive merging to close.

Protocol (as in the AdaRank/CART papers, scaled down): a fixed seeded 60/20/20 train/val/test split of the images,
shared by every task, so no val/test image is ever trained on. (1) Pretrain the backbone on the train images only,
predicting the digit of each image under a random one of the 12 views (of 4 rotations × mirror × inversion) that no
task uses. (2) Per task: fit a linear head on the frozen pretrained features, then fine-tune the encoder with that head
frozen. No dropout, fixed seeds, deterministic single-threaded ops: a rebuild with the same torch writes identical files.

At scale="test", seed 0 (torch 2.13 CPU, ~10 s on 2 cores) the test accuracies are, pretrained + head → fine-tuned →
task arithmetic (λ 0.3): digits .85 → .96 → .79, parity_rot90 .83 → .97 → .84, high_inverted .85 → .97 → .87,
mod3_flipped .78 → .93 → .79. The task vectors of so small a backbone interfere hard: even layer-wise λ fitted on the
val labels reaches only ~.85 on average, so what adaptive merging recovers here is a stress test, not a paper replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import cross_entropy
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from rankmerge.service.suites.common import (
    Suite,
    accuracy,
    cls_features,
    build_once,
    finetune_encoder,
    fit_head,
    save_task_data,
    seeded_split,
    suite_layout,
    train_minibatches,
    vit_config,
)

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the files or the protocol change, so older suites are rebuilt
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
PREPROCESSING = "pixel_values = (view(image / 16) - 0.5) / 0.5, shape [N, 1, 8, 8]"


@dataclass(frozen=True)
class View:
    """How a task sees an image in [0, 1]: quarter turns counter-clockwise, then a left-right mirror, then 1 − x."""

    quarter_turns: int = 0
    mirror: bool = False
    invert: bool = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.rot90(images, self.quarter_turns, dims=(-2, -1))
        out = out.flip(-1) if self.mirror else out
        return 1.0 - out if self.invert else out


ALL_VIEWS = tuple(View(q, m, i) for i in (False, True) for m in (False, True) for q in range(4))


@dataclass(frozen=True)
class Task:
    name: str
    view: View
    labels: tuple[str, ...]  # class names; the class id is the index
    rule: str  # the label as a function of the digit, for the manifest
    of_digit: Callable[[torch.Tensor], torch.Tensor]


TASKS = (
    Task("digits", View(), tuple("0123456789"), "digit", lambda d: d),
    Task("parity_rot90", View(quarter_turns=1), ("even", "odd"), "digit % 2", lambda d: d % 2),
    Task("high_inverted", View(invert=True), ("low", "high"), "digit >= 5", lambda d: (d >= 5).long()),
    Task("mod3_flipped", View(mirror=True), ("0", "1", "2"), "digit % 3", lambda d: d % 3),
)
# Every view but the tasks' own: each fine-tune then meets an input distribution the backbone never saw, as a
# foundation model meets a new domain (pretraining on all 16 views gave weaker fine-tunes and an even worse TA).
PRETRAIN_VIEWS = tuple(v for v in ALL_VIEWS if v not in {t.view for t in TASKS})


@dataclass(frozen=True)
class Scale:
    hidden: int
    layers: int
    heads: int
    patch: int
    pretrain_epochs: int
    finetune_epochs: int
    probe_steps: int = 300  # full-batch steps on frozen features: a converged linear probe is the fair baseline
    pretrain_lr: float = 3e-3
    probe_lr: float = 1e-2
    finetune_lr: float = 1e-3
    batch: int = 64


SCALES = {
    "test": Scale(hidden=32, layers=2, heads=4, patch=4, pretrain_epochs=15, finetune_epochs=20),
    # longer pretraining: smaller task vectors (~10% of the weights' norm, vs ~15%) and a TA between pretrained and fine-tuned
    "bench": Scale(hidden=64, layers=3, heads=4, patch=4, pretrain_epochs=80, finetune_epochs=40, probe_steps=500),
}


DigitsSuite = Suite  # the digits suite has the standard layout


def _layout(root: Path) -> Suite:
    return suite_layout(root, [t.name for t in TASKS])


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] as float32 [N, 8, 8] and digits as int64 [N]."""
    from sklearn.datasets import load_digits  # imported only when a suite is actually built

    raw = load_digits()
    return torch.tensor(raw.images, dtype=torch.float32) / 16.0, torch.as_tensor(raw.target, dtype=torch.int64)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return ((images - 0.5) / 0.5).unsqueeze(1).contiguous()


def _vit_config(scale: Scale, labels: tuple[str, ...] | None = None) -> ViTConfig:
    return vit_config(hidden=scale.hidden, layers=scale.layers, heads=scale.heads, patch=scale.patch, image_size=8,
                      labels=labels)


def _pretrain(vit: ViTModel, images: torch.Tensor, digits: torch.Tensor, scale: Scale, gen: torch.Generator) -> None:
    """Predict the digit of each (train) image under a random one of PRETRAIN_VIEWS, through a throwaway linear head."""
    views = torch.stack([_pixels(view(images)) for view in PRETRAIN_VIEWS])  # [V, N, 1, 8, 8]
    head = torch.nn.Linear(scale.hidden, 10)
    vit.train()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(len(PRETRAIN_VIEWS), (len(idx),), generator=gen)
        return cross_entropy(head(cls_features(vit, views[pick, idx])), digits[idx])

    train_minibatches([*vit.parameters(), *head.parameters()], loss_of, len(digits), scale.pretrain_epochs, scale.batch,
           scale.pretrain_lr, gen, weight_decay=0.01)
    vit.eval()


def _build(suite: DigitsSuite, scale: Scale, seed: int) -> dict[str, Any]:
    """Write every model and data file; return the manifest's measured part."""
    images, digits = _load_digits()
    splits = seeded_split(len(digits), seed, SPLITS)
    gen = torch.Generator().manual_seed(seed)
    base = ViTModel(_vit_config(scale))
    log.info("pretraining a %d-layer ViT on %d train images", scale.layers, len(splits["train"]))
    _pretrain(base, images[splits["train"]], digits[splits["train"]], scale, gen)
    base.save_pretrained(suite.base_dir)
    backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}
    tasks = {}
    for task in TASKS:
        data = {s: (_pixels(task.view(images[idx])), task.of_digit(digits[idx])) for s, idx in splits.items()}
        for s, (x, y) in data.items():
            save_task_data(suite.data[task.name][s], x, y)
        model = ViTForImageClassification(_vit_config(scale, task.labels))
        model.vit.load_state_dict(backbone, strict=True)
        fit_head(model, *data["train"], scale.probe_steps, scale.probe_lr, gen)
        probe = {s: accuracy(model, *data[s]) for s in ("val", "test")}
        log.info("fine-tuning %s (%d labels)", task.name, len(task.labels))
        finetune_encoder(model, *data["train"], scale.finetune_epochs, scale.batch, scale.finetune_lr, gen)
        model.save_pretrained(suite.task_dirs[task.name])
        tasks[task.name] = {
            "num_labels": len(task.labels), "labels": list(task.labels), "label_rule": task.rule, "view": asdict(task.view),
            "accuracy": {"pretrained_head": probe, "finetuned": {s: accuracy(model, *data[s]) for s in ("val", "test")}},
        }
    return {"tasks": tasks, "split_sizes": {s: len(idx) for s, idx in splits.items()},
            "split_indices": {s: idx.tolist() for s, idx in splits.items()}}


def build_digits_suite(root: Path, scale: str = "test", seed: int = 0) -> DigitsSuite:
    """Build (or reuse, when root/suite.json records the same scale and seed) the digits suite under root."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    suite, config = _layout(Path(root)), SCALES[scale]
    return build_once(suite, {"format": FORMAT, "scale": scale, "seed": seed}, lambda: {
        "config": asdict(config), "preprocessing": PREPROCESSING, "source": "sklearn.datasets.load_digits",
        "pretraining": {"objective": "digit of each train image under a random one of these views",
                        "views": [asdict(v) for v in PRETRAIN_VIEWS]},
        **_build(suite, config, seed)})
