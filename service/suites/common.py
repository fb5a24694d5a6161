"""What every real-data suite shares: its on-disk layout, its manifest, and a deterministic, seeded build context.

A suite is ordinary files a user could have made: one pretrained HF backbone, one fine-tuned HF model per task, and
per task and split (train / val / test) one data file that `rankmerge run` reads as it reads any user's data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


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
                      epochs: int, batch: int, lr: float, gen: torch.Generator, weight_decay: float = 0.0) -> None:
    """AdamW over seeded shuffled minibatches of n examples; loss_of(batch indices) -> loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
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
