"""What every real-data suite shares: its on-disk layout, its manifest, and a deterministic, seeded build context.

A suite is ordinary files a user could have made: one pretrained HF backbone, one fine-tuned HF model per task, and
per task and split (train / val / test) one data file that `rankmerge run` reads as it reads any user's data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from rankmerge.workers.atomic_io import write_atomic

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Suite:
    root: Path
    base_dir: Path  # the pretrained backbone (HF directory)
    task_dirs: dict[str, Path]  # task -> fine-tuned HF directory
    data: dict[str, dict[str, Path]]  # task -> split -> data file (labels included; only evaluation reads them)

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.root / "suite.json").read_text())


def suite_layout(root: Path, tasks: list[str] | tuple[str, ...], data_suffix: str = ".safetensors") -> Suite:
    """The standard file layout: models/base, models/<task>, data/<task>/<split><suffix>."""
    return Suite(
        root=root,
        base_dir=root / "models" / "base",
        task_dirs={t: root / "models" / t for t in tasks},
        data={t: {s: root / "data" / t / f"{s}{data_suffix}" for s in SPLIT_NAMES} for t in tasks},
    )


def is_built(suite: Suite, identity: dict[str, Any]) -> bool:
    """True when suite.json records the same identity (format, scale, seed, …) and every model and data file exists."""
    try:
        manifest = suite.manifest
    except (OSError, ValueError):
        return False
    files = [suite.base_dir / "model.safetensors", *(d / "model.safetensors" for d in suite.task_dirs.values()),
             *(p for splits in suite.data.values() for p in splits.values())]
    same = all(manifest.get(k) == v for k, v in identity.items())
    return same and all(f.is_file() for f in files)


def forget_manifest(suite: Suite) -> None:
    """Called before a rebuild: a half-rebuilt suite must never look complete."""
    (suite.root / "suite.json").unlink(missing_ok=True)


def write_manifest(suite: Suite, manifest: dict[str, Any]) -> None:
    """Written last and atomically: its presence marks the suite complete."""
    path = suite.root / "suite.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")


def build_once(suite: Suite, identity: dict[str, Any], build: Callable[[], dict[str, Any]]) -> Suite:
    """Reuse the suite when its manifest records this identity (format, scale, seed, …) and every file exists; else
    rebuild it under `deterministic(identity["seed"])` and write the manifest: the identity, then what build returns."""
    if is_built(suite, identity):
        log.info("reusing the suite in %s", suite.root)
        return suite
    forget_manifest(suite)
    start = time.perf_counter()
    with deterministic(identity["seed"]):
        measured = build()
    write_manifest(suite, {**identity, **measured})
    log.info("built the suite in %s in %.1f s", suite.root, time.perf_counter() - start)
    return suite


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic, single-threaded torch for a build; the caller's RNG state and settings come back after.

    One thread: suite models are too small to gain from more, a busy neighbour core makes multi-threaded steps ~10×
    slower, and the written bytes then do not depend on the machine's core count.
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0])
            torch.set_num_threads(previous[1])


def train_minibatches(params: list[torch.nn.Parameter], loss_of: Callable[[torch.Tensor], torch.Tensor], n: int,
                      epochs: int, batch: int, lr: float, gen: torch.Generator, weight_decay: float = 0.0,
                      progress: str | None = None) -> None:
    """AdamW over seeded shuffled minibatches of n examples; loss_of(batch indices) -> loss. With `progress`, a
    progress bar of that name counts the epochs (long pretraining runs)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in tqdm(range(epochs), desc=progress, disable=progress is None, leave=False):
        for idx in torch.randperm(n, generator=gen).split(batch):
            opt.zero_grad()
            loss_of(idx).backward()
            opt.step()


def seeded_split(n: int, seed: int, fractions: dict[str, float]) -> dict[str, torch.Tensor]:
    """Disjoint sorted index sets from one seeded permutation, cut by the given fractions (train, val, test)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(fractions["train"] * n), int(fractions["val"] * n)
    cuts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    return {name: idx.sort().values for name, idx in cuts.items()}


def save_task_data(path: Path, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
    """One task split as `rankmerge run` reads image data: pixel_values float32 [N, C, H, W], labels int64 [N]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"pixel_values": pixel_values.contiguous(), "labels": labels.contiguous()}, str(path))


def vit_config(*, hidden: int, layers: int, heads: int, patch: int, image_size: int, channels: int = 1,
               labels: tuple[str, ...] | None = None) -> ViTConfig:
    """A dropout-free ViT (deterministic training); with labels, the config of a classification task model."""
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    return ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                     image_size=image_size, patch_size=patch, num_channels=channels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **names)


def cls_features(vit: ViTModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The CLS token after the final layer norm: exactly what ViTForImageClassification's classifier reads."""
    return vit(pixel_values=pixel_values).last_hidden_state[:, 0]


def fit_head(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
             gen: torch.Generator) -> None:
    """Linear probe: the classifier alone, full batch, on frozen pretrained features (the paper's first stage)."""
    with torch.no_grad():
        feats = cls_features(model.vit.eval(), x)
    fit_probe(model.classifier, feats, y, steps, lr, gen)


def finetune_encoder(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int,
                     lr: float, gen: torch.Generator) -> None:
    """The encoder only; the probe head stays frozen so the task vector lives entirely in the backbone."""
    model.train()
    train_minibatches(list(model.vit.parameters()), lambda idx: cross_entropy(model(pixel_values=x[idx]).logits, y[idx]),
                      len(y), epochs, batch, lr, gen)
    model.eval()


@torch.no_grad()
def accuracy(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, rounded as the manifests record it."""
    model.eval()
    return round(float((model(pixel_values=x).logits.argmax(-1) == y).float().mean()), 4)


def fit_probe(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
              gen: torch.Generator) -> None:
    """Linear probe on frozen features, full batch: the first stage of the protocol, for any backbone's features."""
    train_minibatches(list(head.parameters()), lambda idx: torch.nn.functional.cross_entropy(head(features[idx]), labels[idx]),
                      len(labels), steps, len(labels), lr, gen, weight_decay=0.01)
