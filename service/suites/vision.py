"""Real-data vision suites of 8, 14 and 20 tasks (plus a 3-task smoke suite for CI): one small ViT pretrained by the
builder, one ViTForImageClassification fine-tuned from it per task, and every task's data, all from offline sources.

Sources: Fashion-MNIST (Debian `dataset-fashion-mnist`), scikit-learn's handwritten digits, and glyphs rendered with
Pillow from installed font files (see image_sources.py). Every image is grey 16×16.

Tasks are genuinely different questions about different images: clothing type, handwritten digit, typeset digit,
Latin upper/lower-case letter, Greek, Cyrillic, Hebrew, Armenian and Georgian letters, ASCII punctuation, math
symbols, and three font-metadata questions (serif/sans/mono, bold or not, italic or not). At most a third of any
suite is derived (coarse clothing groups, rotated digits, inverted clothes, letter case, the script of a letter).
vision8 ⊂ vision14 ⊂ vision20: each suite is a prefix of one task list. Each task's data, head and fine-tune are
seeded by (seed, task name) alone, so a task's files are identical in every suite that holds it.

Splits: rendered tasks split by type design (FontGroup: all weights/slants and metric clones of a design go to one
split), so test fonts are never seen in training; Fashion-MNIST tasks test on its t10k file; the digits use one
seeded 60/20/20 split of the 1,797 images.

Protocol (AdaRank/CART papers, scaled down): (1) pretrain the backbone on a broad mixture that shares no image with
any task split: the identity of ~1,400 characters that no task uses (Greek/Cyrillic/Armenian lower case, currency,
arrows, math, box drawing, shapes, Devanagari, Thai, Ethiopic, Cherokee, Runic, …) rendered only in train-split fonts,
plus self-supervised rotation prediction on Fashion-MNIST rows no task uses. Accented Latin letters are left out on
purpose: they are the task letters again, and with them a linear probe already matches fine-tuning. (2) Per task: a linear head on frozen
pretrained features, then the encoder fine-tuned with that head frozen. Dropout-free, seeded, deterministic and
single-threaded: a rebuild with the same torch writes identical model and data files.

Measured (seed 0, torch 2.13 CPU, one thread, 2 busy cores): vision-smoke builds in ~20-45 s; vision8 in 555 s, vision20 in
1,011 s. vision8 test accuracy, pretrained + head -> fine-tuned -> task arithmetic (λ 0.3): averages .846 -> .864 -> .802. The linear
probe on these features is a strong baseline (the paper's is zero-shot), and on the Latin-letter tasks fine-tuning
no longer beats it on unseen fonts; the merging gap (fine-tuned − TA ≈ 6 points) is real on every task. vision20:
.851 -> .872 -> .622 (TA loses 25 points over 20 tasks).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from rankmerge.service.suites.common import (
    Suite,
    accuracy,
    build_once,
    cls_features,
    finetune_encoder,
    fit_head,
    save_task_data,
    seeded_split,
    suite_layout,
    train_minibatches,
    vit_config,
)
from rankmerge.service.suites.image_sources import (
    FASHION_DIR,
    FASHION_LABELS,
    FontFile,
    GlyphRenderer,
    find_fonts,
    load_fashion_mnist,
    load_sklearn_digits,
    resize,
)
from rankmerge.service.suites.vision_catalog import FONTS, PRETRAIN_CHARS, STYLES, SUITES, TASKS, DigitsTask, FashionTask, GlyphTask

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the files or the protocol change, so older suites are rebuilt
IMAGE_SIZE = 16
PREPROCESSING = f"grey image in [0, 1] resized to {IMAGE_SIZE}×{IMAGE_SIZE}, pixel_values = (x - 0.5) / 0.5, [N, 1, 16, 16]"
FASHION_TASK_ROWS = 30_000  # Fashion-MNIST train rows [0, 30000) feed the tasks, the rest feed pretraining
DIGIT_SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


@dataclass(frozen=True)
class Scale:
    hidden: int
    layers: int
    heads: int
    patch: int
    fonts: str  # key of FONTS: which font groups exist at this scale
    sizes: dict[str, int]  # images per split of every rendered or Fashion-MNIST task
    pretrain_glyphs: int
    pretrain_fashion: int
    pretrain_epochs: int
    finetune_epochs: int
    pretrain_classes: int | None = None  # evenly spaced over the covered characters (all of them when None)
    probe_steps: int = 300
    pretrain_lr: float = 2e-3
    probe_lr: float = 1e-2
    finetune_lr: float = 1e-3
    batch: int = 64


SCALES = {
    "smoke": Scale(hidden=48, layers=2, heads=4, patch=4, fonts="core", sizes={"train": 600, "val": 200, "test": 300},
                   pretrain_glyphs=4000, pretrain_fashion=0, pretrain_epochs=4, finetune_epochs=16, pretrain_classes=100,
                   finetune_lr=2e-3),
    "bench": Scale(hidden=96, layers=4, heads=4, patch=4, fonts="full", sizes={"train": 3000, "val": 500, "test": 1000},
                   pretrain_glyphs=60_000, pretrain_fashion=20_000, pretrain_epochs=4, finetune_epochs=6),
    # the papers' regime (a backbone far from the tasks): pretrained briefly on a few dozen symbols that no task uses,
    # so each task's fine-tune moves the encoder far and task vectors interfere
    "shift": Scale(hidden=96, layers=4, heads=4, patch=4, fonts="full", sizes={"train": 3000, "val": 500, "test": 1000},
                   pretrain_glyphs=2000, pretrain_fashion=0, pretrain_epochs=1, finetune_epochs=10, pretrain_classes=16),
}


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return ((images - 0.5) / 0.5).unsqueeze(1).contiguous()


def _task_seed(seed: int, name: str) -> int:
    """A task's own seed: its files depend on (seed, name) only, not on which suite or position it is built in."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def balanced_sample(labels: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n indices, classes interleaved round-robin, each class cycling through its own shuffled members."""
    columns = []
    per_class = -(-n // int(labels.max() + 1))
    for k in range(int(labels.max()) + 1):
        members = (labels == k).nonzero()[:, 0]
        rounds = -(-per_class // len(members))
        columns.append(torch.cat([members[torch.randperm(len(members), generator=gen)] for _ in range(rounds)])[:per_class])
    return torch.stack(columns, 1).reshape(-1)[:n]


class Sources:
    """Everything a build reads, loaded and checked before any training (a missing package fails in a second)."""

    def __init__(self, scale: Scale, tasks: list[Any]) -> None:
        self.fonts = find_fonts(FONTS[scale.fonts])
        self.renderer = GlyphRenderer(IMAGE_SIZE)
        need_fashion = scale.pretrain_fashion > 0 or any(isinstance(t, FashionTask) for t in tasks)
        self.fashion = load_fashion_mnist() if need_fashion else None
        self.digits = load_sklearn_digits() if any(isinstance(t, DigitsTask) for t in tasks) else None

    def glyph_pairs(self, chars: str, fonts: list[FontFile]) -> list[tuple[str, FontFile]]:
        return [(c, f) for f in fonts for c in chars if self.renderer.covers(f.path, c)]

    def render(self, pairs: list[tuple[str, FontFile]], gen: torch.Generator) -> torch.Tensor:
        return self.renderer.render([(c, f.path) for c, f in pairs], gen)


def _glyph_data(task: GlyphTask, src: Sources, scale: Scale, gen: torch.Generator) -> dict[str, Any]:
    out = {}
    for split, n in scale.sizes.items():
        pairs = src.glyph_pairs(task.chars, [f for f in src.fonts if f.split == split])
        labels = torch.tensor([task.label_of(c, f) for c, f in pairs], dtype=torch.int64)
        if len(pairs) == 0 or len(labels.unique()) < len(task.labels):
            raise RuntimeError(f"task {task.name}: the {split} fonts do not cover every class; change FONTS or the task")
        pick = balanced_sample(labels, n, gen).tolist()
        out[split] = (src.render([pairs[i] for i in pick], gen), labels[pick])
    return out


def _fashion_data(task: FashionTask, src: Sources, scale: Scale, gen: torch.Generator) -> dict[str, Any]:
    (train_x, train_y), (test_x, test_y) = src.fashion["train"], src.fashion["t10k"]
    rows = torch.randperm(FASHION_TASK_ROWS, generator=gen)
    n_train, n_val = scale.sizes["train"], scale.sizes["val"]
    picks = {"train": (train_x, train_y, rows[:n_train]), "val": (train_x, train_y, rows[n_train:n_train + n_val]),
             "test": (test_x, test_y, torch.randperm(len(test_y), generator=gen)[:scale.sizes["test"]])}
    out = {}
    for split, (x, y, idx) in picks.items():
        images = resize(x[idx.sort().values], IMAGE_SIZE)
        out[split] = (1.0 - images if task.invert else images, task.of_class(y[idx.sort().values]))
    return out


def _digits_data(task: DigitsTask, src: Sources, seed: int) -> dict[str, Any]:
    images, digits = src.digits
    splits = seeded_split(len(digits), seed, DIGIT_SPLITS)  # one split shared by every digits task
    return {s: (resize(torch.rot90(images[idx], task.quarter_turns, dims=(-2, -1)), IMAGE_SIZE), digits[idx])
            for s, idx in splits.items()}


def task_data(task: Any, src: Sources, scale: Scale, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """split -> (pixel_values [N, 1, 16, 16], labels [N]) for one task."""
    gen = torch.Generator().manual_seed(_task_seed(seed, task.name))
    if isinstance(task, GlyphTask):
        raw = _glyph_data(task, src, scale, gen)
    elif isinstance(task, FashionTask):
        raw = _fashion_data(task, src, scale, gen)
    else:
        raw = _digits_data(task, src, seed)
    return {s: (_pixels(x), y) for s, (x, y) in raw.items()}


def _pretrain_data(src: Sources, scale: Scale, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Images [N, 16, 16] and labels: character identity for glyphs, C + quarter turns for Fashion-MNIST rows."""
    fonts = [f for f in src.fonts if f.split in ("train", "pretrain")]
    covered = sorted({c for c, _ in src.glyph_pairs(PRETRAIN_CHARS, fonts)})
    chars = covered[::-(-len(covered) // scale.pretrain_classes)] if scale.pretrain_classes else covered
    pairs = src.glyph_pairs("".join(chars), fonts)
    labels = torch.tensor([chars.index(c) for c, _ in pairs], dtype=torch.int64)
    pick = balanced_sample(labels, scale.pretrain_glyphs, gen).tolist()
    images, targets = [src.render([pairs[i] for i in pick], gen)], [labels[pick]]
    if scale.pretrain_fashion:
        rows = FASHION_TASK_ROWS + torch.randperm(len(src.fashion["train"][1]) - FASHION_TASK_ROWS, generator=gen)
        clothes = resize(src.fashion["train"][0][rows[:scale.pretrain_fashion].sort().values], IMAGE_SIZE)
        turns = torch.randint(4, (len(clothes),), generator=gen)
        images.append(torch.stack([torch.rot90(x, int(k), dims=(-2, -1)) for x, k in zip(clothes, turns)]))
        targets.append(len(chars) + turns)
    info = {"characters": len(chars), "glyph_images": len(pick), "fonts": sorted({f.path.name for _, f in pairs}),
            "fashion_rotation_images": scale.pretrain_fashion, "fashion_rows": f"train[{FASHION_TASK_ROWS}:]"}
    return torch.cat(images), torch.cat(targets), info


def _pretrain(vit: ViTModel, src: Sources, scale: Scale, gen: torch.Generator) -> dict[str, Any]:
    images, labels, info = _pretrain_data(src, scale, gen)
    x = _pixels(images)
    head = torch.nn.Linear(scale.hidden, int(labels.max()) + 1)
    vit.train()
    log.info("pretraining a %d-layer ViT on %d images (%d classes)", scale.layers, len(labels), head.out_features)
    train_minibatches([*vit.parameters(), *head.parameters()],
                      lambda idx: cross_entropy(head(cls_features(vit, x[idx])), labels[idx]),
                      len(labels), scale.pretrain_epochs, 2 * scale.batch, scale.pretrain_lr, gen, weight_decay=0.01,
                      progress="pretraining epochs")
    vit.eval()
    with torch.no_grad():
        sample = torch.randperm(len(labels), generator=gen)[:2000]
        info["train_accuracy"] = round(float((head(cls_features(vit, x[sample])).argmax(-1) == labels[sample]).float().mean()), 4)
    return info


def _vit(scale: Scale, labels: tuple[str, ...] | None = None) -> ViTConfig:
    return vit_config(hidden=scale.hidden, layers=scale.layers, heads=scale.heads, patch=scale.patch,
                      image_size=IMAGE_SIZE, labels=labels)


def _task_record(task: Any, src: Sources, data: dict[str, Any]) -> dict[str, Any]:
    record = {"num_labels": len(task.labels), "labels": list(task.labels), "label_rule": task.rule,
              "derived": task.derived, "source": task.source, "split_sizes": {s: len(y) for s, (_, y) in data.items()}}
    if isinstance(task, GlyphTask):
        record["fonts"] = {s: sorted({f.path.name for f in src.fonts if f.split == s}) for s in data}
    return record


def _build(suite: Suite, names: list[str], scale: Scale, seed: int) -> dict[str, Any]:
    """Write every model and data file; return the manifest's measured part."""
    tasks = [TASKS[n] for n in names]
    src = Sources(scale, tasks)
    base = ViTModel(_vit(scale))
    pretraining = _pretrain(base, src, scale, torch.Generator().manual_seed(seed))
    base.save_pretrained(suite.base_dir)
    backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}
    records = {}
    for task in tqdm(tasks, desc="tasks", leave=False):
        data = task_data(task, src, scale, seed)
        for split, (x, y) in data.items():
            save_task_data(suite.data[task.name][split], x, y)
        torch.manual_seed(_task_seed(seed, task.name))  # the head's init, too, is the task's own
        gen = torch.Generator().manual_seed(_task_seed(seed, task.name) + 1)
        model = ViTForImageClassification(_vit(scale, task.labels))
        model.vit.load_state_dict(backbone, strict=True)
        fit_head(model, *data["train"], scale.probe_steps, scale.probe_lr, gen)
        probe = {s: accuracy(model, *data[s]) for s in ("val", "test")}
        finetune_encoder(model, *data["train"], scale.finetune_epochs, scale.batch, scale.finetune_lr, gen)
        tuned = {s: accuracy(model, *data[s]) for s in ("val", "test")}
        model.save_pretrained(suite.task_dirs[task.name])
        log.info("%s: test accuracy %.3f pretrained+head -> %.3f fine-tuned", task.name, probe["test"], tuned["test"])
        records[task.name] = {**_task_record(task, src, data), "accuracy": {"pretrained_head": probe, "finetuned": tuned}}
    fonts = {g.name: {"style": g.style, "split": g.split, "package": g.package,
                      "files": [f.path.name for f in src.fonts if f.group == g.name]} for g in FONTS[scale.fonts]}
    sources = {"fonts": fonts, "sklearn_digits": "sklearn.datasets.load_digits", "digit_splits": DIGIT_SPLITS,
               **({"fashion_mnist": str(FASHION_DIR), "fashion_task_rows": f"train[:{FASHION_TASK_ROWS}] and t10k"}
                  if src.fashion is not None else {})}
    return {"tasks": records, "pretraining": pretraining, "sources": sources,
            "derived_tasks": sum(TASKS[n].derived for n in names)}


def build_vision_suite(root: Path, seed: int = 0, suite: str = "vision8") -> Suite:
    """Build (or reuse, when root/suite.json records the same suite, format and seed) a vision suite under root."""
    if suite not in SUITES:
        raise ValueError(f"unknown vision suite {suite!r}; choose one of {sorted(SUITES)}")
    scale_name, names = SUITES[suite]
    layout, scale = suite_layout(Path(root), names), SCALES[scale_name]

    def build() -> dict[str, Any]:
        start = time.perf_counter()
        measured = _build(layout, names, scale, seed)
        return {"scale": scale_name, "config": asdict(scale), "image_size": IMAGE_SIZE, "styles": list(STYLES),
                "preprocessing": PREPROCESSING, "fashion_labels": list(FASHION_LABELS), **measured,
                "build_seconds": round(time.perf_counter() - start, 1)}

    return build_once(layout, {"format": FORMAT, "suite": suite, "seed": seed}, build)
