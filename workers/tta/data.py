"""Per-task unlabeled data streams: shuffled with a seed, cyclic, with a cursor that checkpoints and resumes exactly.

A task's data is one of:
- a `.safetensors` or `.npz` file of preprocessed tensors, one row per example: `pixel_values` (vision) or
  `input_ids` + `attention_mask` (text); an optional `labels` row is used only to evaluate (npz: allow_pickle=False);
- a `.jsonl` file of {"text": ..., optional "label": int}, tokenised with the base model's tokenizer;
- a folder of images (optionally one subfolder per class, sorted names = label ids), preprocessed with the base
  model's image processor;
- a Hugging Face dataset (image and label columns) as `save_to_disk` wrote it, or as parquet files (a dataset in the
  Hub cache); of several splits, `test`. Needs the `datasets` package (the `hf` extra).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import zipfile

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods.elementwise import stable_seed
from rankmerge.workers.tta.objectives import TEACHER_INDEX, TEACHER_LOGITS

log = logging.getLogger(__name__)

INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask")
TARGET_KEYS = (TEACHER_LOGITS, TEACHER_INDEX)  # label-free targets computed before step 1 (workers/tta/teachers.py)


def load_task_data(path: str | Path, task: str, base_dir: Path | None = None, max_length: int = 128) -> dict[str, Tensor]:
    path = Path(path)
    if not path.exists():
        raise MergeInputError(f"data for task {task!r}: {path} does not exist", "point tta.data.<task> at a data file or image folder")
    if path.is_file() and path.stat().st_size == 0:
        raise MergeInputError(f"data for task {task!r}: {path} is empty (0 bytes)", "re-export the data file")
    tensors = _read(path, task, base_dir, max_length)
    _check(tensors, path, task)
    return tensors


def _read(path: Path, task: str, base_dir: Path | None, max_length: int) -> dict[str, Tensor]:
    try:
        if path.is_dir() and is_hf_dataset(path):
            tensors = _hf_dataset(path, task, base_dir)
        elif path.is_dir():
            tensors = _image_folder(path, task, base_dir)
        elif path.suffix == ".safetensors":
            tensors = load_file(str(path))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                tensors = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
        elif path.suffix == ".jsonl":
            tensors = _jsonl(path, task, base_dir, max_length)
        else:
            raise MergeInputError(f"data for task {task!r}: {path.name} is not .safetensors, .npz, .jsonl or an image folder", "convert the data")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SafetensorError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeInputError(f"data for task {task!r}: cannot read {path.name} ({reason})", "re-export the data file") from None
    return tensors


def _check(tensors: dict[str, Tensor], path: Path, task: str) -> None:
    """Inputs, rows and values, before any work: a NaN pixel would make every merged weight NaN."""
    if not any(k in tensors for k in ("pixel_values", "input_ids")):
        raise MergeInputError(f"data for task {task!r} has no pixel_values or input_ids", f"found: {', '.join(tensors) or 'nothing'}")
    rows = {v.shape[0] if v.dim() else None for v in tensors.values()}
    if rows == {0}:
        raise MergeInputError(f"data for task {task!r}: {path.name} has no examples (0 rows)", "give at least one example per task")
    if len(rows) != 1 or None in rows:
        shown = sorted(r for r in rows if r is not None)
        raise MergeInputError(f"data for task {task!r}: tensors disagree on the number of examples ({shown})", "give every tensor one row per example")
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise MergeInputError(f"data for task {task!r}: {key!r} in {path.name} has NaN/Inf values", "re-export the data without them")


def _jsonl(path: Path, task: str, base_dir: Path | None, max_length: int) -> dict[str, Tensor]:
    import json

    from transformers import AutoTokenizer

    texts, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(str(record["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MergeInputError(f"data for task {task!r}: line {number} of {path.name} is not a JSON object with a \"text\"", "fix the JSONL") from None
        if "label" in record:
            labels.append(int(record["label"]))
    if not texts:
        raise MergeInputError(f"data for task {task!r}: {path.name} has no examples (no text lines)", "give at least one example per task")
    tokenizer = _from_base(AutoTokenizer, base_dir, task, "text", "tokenizer (tokenizer.json / tokenizer_config.json)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MergeInputError(f"data for task {task!r}: the base's tokenizer has neither a pad nor an eos token",
                                  "set tokenizer.pad_token and save the tokenizer into the base directory")
        log.warning("task %r: the base's tokenizer has no pad token; padding with its eos token %r, as transformers "
                    "pipelines do", task, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if labels and len(labels) == len(texts):
        out["labels"] = torch.tensor(labels)
    return out


def _from_base(auto_class: Any, base_dir: Path | None, task: str, kind: str, what: str) -> Any:
    """The base's tokenizer or image processor; missing, it is named as the cause (the data file is fine)."""
    try:
        if base_dir is None:
            raise OSError("no base directory")
        return auto_class.from_pretrained(base_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise MergeInputError(f"data for task {task!r} is {kind}, but the base directory has no {what} "
                                f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
                                f"save the base model's {what.split(' (')[0]} into {base_dir} (save_pretrained)") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def _image_folder(path: Path, task: str, base_dir: Path | None) -> dict[str, Tensor]:
    from PIL import Image
    from transformers import AutoImageProcessor

    classes = sorted(p for p in path.iterdir() if p.is_dir())
    files = [(f, c) for c, folder in enumerate(classes) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not classes:
        files = [(f, -1) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise MergeInputError(f"data for task {task!r}: no images in {path}", f"put {', '.join(IMAGE_SUFFIXES)} files there")
    processor = _from_base(AutoImageProcessor, base_dir, task, "an image folder", "image processor (preprocessor_config.json)")

    def load(f: Path) -> Any:
        with Image.open(f) as image:
            return image.copy()

    out = {"pixel_values": _pixels(processor, [f for f, _ in files], load)}
    if classes:
        out["labels"] = torch.tensor([c for _, c in files])
    return out


def _pixels(processor: Any, rows: Sequence[Any], image: Callable[[Any], Any], chunk: int = 256) -> Tensor:
    """Preprocess images a chunk at a time (`image(row)` opens one), so only one chunk of decoded images is held."""
    parts = [processor(images=[image(r) for r in rows[i : i + chunk]], return_tensors="pt")["pixel_values"]
             for i in range(0, len(rows), chunk)]
    return torch.cat(parts)


HF_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
SPLIT_FILE = re.compile(r"^([A-Za-z0-9_.]+?)-\d{5}-of-\d{5}\.parquet$")  # the Hub's parquet shard names


def is_hf_dataset(path: Path) -> bool:
    """A `save_to_disk` folder (a dataset or a dict of splits), or a folder of parquet files (the Hub's layout)."""
    return any((path / name).is_file() for name in HF_DATASET_FILES) or next(path.rglob("*.parquet"), None) is not None


def _hf_dataset(path: Path, task: str, base_dir: Path | None) -> dict[str, Tensor]:
    """Images through the base's image processor; a ClassLabel (or `label`) column becomes `labels` (scoring only)."""
    from transformers import AutoImageProcessor

    dataset = _hf_split(path, task)
    image_col = _column(dataset, task, path, "Image", ("image", "img"), "an image")
    label_col = _column(dataset, task, path, "ClassLabel", ("label", "labels"), None)
    processor = _from_base(AutoImageProcessor, base_dir, task, "a Hugging Face image dataset",
                           "image processor (preprocessor_config.json)")
    out = {"pixel_values": _pixels(processor, range(len(dataset)), lambda i: dataset[i][image_col].convert("RGB"))}
    if label_col is not None:
        out["labels"] = torch.tensor(dataset[label_col], dtype=torch.int64)
    return out


def _hf_split(path: Path, task: str) -> Any:
    """The dataset at `path`: itself, or its `test` split (the only split when there is one)."""
    try:
        import datasets
    except ImportError:
        raise MergeInputError(f"data for task {task!r} is a Hugging Face dataset, and reading it needs the `datasets` "
                              "package", "pip install 'rankmerge[hf]'") from None
    files: dict[str, list[Path]] = {}
    if any((path / name).is_file() for name in HF_DATASET_FILES):
        loaded = datasets.load_from_disk(str(path))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    else:  # parquet files named <split>-NNNNN-of-NNNNN.parquet (else a <split>/ folder), as on the Hub
        for f in sorted(path.rglob("*.parquet")):
            named = SPLIT_FILE.match(f.name)
            files.setdefault(named.group(1) if named else f.parent.name, []).append(f)
        splits = dict.fromkeys(files)
    name = "test" if "test" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    if name is None:
        raise MergeInputError(f"data for task {task!r}: {path} holds the splits {sorted(splits)} and none is `test`",
                              f"point tta.data.{task} at the split to use (its own folder)")
    if splits[name] is not None:
        return splits[name]
    folders = sorted({str(f.parent.relative_to(path)) for f in files[name]})
    if len(folders) > 1:
        raise MergeInputError(f"data for task {task!r}: {path} holds {name!r} files of several configurations ({', '.join(folders)})",
                              f"point tta.data.{task} at one configuration's folder")
    return datasets.Dataset.from_parquet([str(f) for f in files[name]])


def _column(dataset: Any, task: str, path: Path, feature: str, names: tuple[str, ...], needed: str | None) -> str | None:
    """The column of feature type `feature` (else the first of `names`); a needed one missing is a one-line error."""
    typed = [c for c, f in dataset.features.items() if type(f).__name__ == feature]
    found = typed[0] if typed else next((c for c in names if c in dataset.column_names), None)
    if found is None and needed:
        raise MergeInputError(f"data for task {task!r}: {path} has no {needed} column (columns: "
                              f"{', '.join(dataset.column_names)})", f"give the dataset an `{names[0]}` column of type {feature}")
    return found


@dataclass
class IndexStream:
    """Cyclic, seeded, per-epoch shuffled row indices of one task's data; (epoch, position) is the whole state.

    Only the row count is needed, so the coordinator can own the cursors while workers hold the data. `pool`: the
    rows to draw from (default all `size` rows; the label-free guard holds some out, workers/tta/guard.py).
    """

    task: str
    size: int
    seed: int
    epoch: int = 0
    position: int = 0
    pool: Tensor | None = field(default=None, repr=False)
    _order: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.pool is not None:
            self.size = int(self.pool.numel())

    def _permutation(self) -> Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, self.task, self.epoch))
            order = torch.randperm(self.size, generator=gen)
            self._order = order if self.pool is None else self.pool[order]
        return self._order

    def next_indices(self, batch_size: int) -> Tensor:
        parts, needed = [], batch_size
        while needed > 0:
            take = min(needed, self.size - self.position)
            parts.append(self._permutation()[self.position : self.position + take])
            self.position += take
            needed -= take
            if self.position == self.size:  # next epoch, new seeded order
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return torch.cat(parts)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def model_inputs(tensors: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """The model-input rows `index` of a task's data, with their teacher targets (labels never reach the model)."""
    return {k: v[index] for k, v in tensors.items() if k in INPUT_KEYS or k in TARGET_KEYS}


def num_rows(tensors: dict[str, Tensor]) -> int:
    return next(iter(tensors.values())).shape[0]


class TaskStream(IndexStream):
    """An IndexStream that also holds the data and hands out input batches."""

    def __init__(self, task: str, tensors: dict[str, Tensor], seed: int) -> None:
        super().__init__(task, num_rows(tensors), seed)
        self.tensors = tensors

    def next_batch(self, batch_size: int) -> dict[str, Tensor]:
        return model_inputs(self.tensors, self.next_indices(batch_size))
