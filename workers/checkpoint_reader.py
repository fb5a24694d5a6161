"""Lazy reading of HF model directories: headers first, then one tensor at a time.

Tensors are read with positional reads into fresh buffers rather than through a memory map: mapped pages of every
input file would otherwise count towards (and inflate) the process's resident memory as a merge walks the files, and
freeing a tensor here returns its memory at once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

import torch

from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.safetensors_format import TensorEntry, nbytes, read_header

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin.index.json", "pytorch_model.bin", "model.pt", "model.bin", "adapter_model.bin")


class Checkpoint(Protocol):
    """What a merge reads a fine-tuned model through: a full checkpoint (`ModelCheckpoint`), a PEFT adapter on the base
    (`peft_adapter.AdapterCheckpoint`) or an encoder with its zero-shot head (`zero_shot.ZeroShotTask`). Keys, shapes
    and dtypes come from headers; a tensor is read only when asked for, into the caller's buffer when given one."""

    name: str
    path: Path
    files: list[Path]  # what identifies the model's content (fingerprints, resume checks)
    config: dict
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def keys(self) -> list[str]: ...

    def read(self, key: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or with `rows` the block [start, stop) of its first dimension, into `out` when given (exactly
        its bytes)."""
        ...

    def nbytes(self, key: str) -> int: ...

    def low_rank(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The task vector of `key` as (left, right) factors where the model holds it so (LoRA), else None."""
        ...

    def close(self) -> None: ...


def factor_rows(factors: tuple[torch.Tensor, torch.Tensor] | None,
                rows: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A row block's share of a task vector given as (left, right) factors (`Checkpoint.low_rank`): left's rows."""
    return factors if factors is None or rows is None else (factors[0][rows[0]:rows[1]], factors[1])


class ModelCheckpoint:
    """One HF model directory, opened lazily. Only headers are read at construction."""

    def __init__(self, path: str | os.PathLike, name: str = "model", allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.name = name
        if not self.path.exists():
            raise MergeInputError(f"{name}: path {self.path} does not exist", "check the path in the job spec")
        if not self.path.is_dir():
            raise MergeInputError(
                f"{name}: {self.path} is not a model directory", "pass the folder that holds config.json and the weights"
            )
        self.config: dict = self._read_config()
        self._fds: dict[Path, int] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.entries: dict[str, TensorEntry] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        files = self.files = self._weight_files()  # the weight files read (their content identifies the model)
        if files[0].suffix == ".safetensors":
            self._open_safetensors(files)
        else:
            self._open_pickle(files, allow_pickle)

    # ---- discovery -------------------------------------------------------------------------------------------------
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise MergeInputError(f"{self.name}: {cfg} is not valid JSON ({exc.msg})", "fix or restore config.json") from None

    def _weight_files(self) -> list[Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.exists():
            weight_map = self._weight_map(index)
            self._index_map = {k: self.path / v for k, v in weight_map.items()}
            files = sorted(set(self._index_map.values()))
            for f in files:
                if not f.exists():
                    raise MergeInputError(f"{self.name}: shard {f.name} named in {index.name} is missing", "copy the whole checkpoint directory")
            return files
        self._index_map = None
        single = self.path / SAFETENSORS_SINGLE
        if single.exists():
            return [single]
        others = sorted(self.path.glob("*.safetensors"))
        if len(others) == 1:
            return others
        for pickle_name in PICKLE_NAMES:
            if (self.path / pickle_name).exists():
                return [self.path / pickle_name]
        raise MergeInputError(
            f"{self.name}: {self.path} is not a model directory (no model.safetensors, no shard index)",
            "pass a folder written by save_pretrained",
        )

    def _weight_map(self, index: Path) -> dict[str, str]:
        """An index's tensor name -> shard file name map, checked: a hand-edited index must not crash the merge."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MergeInputError(f"{self.name}: {index} is not a valid index", "re-save the checkpoint") from None
        if not isinstance(weight_map, dict):
            raise MergeInputError(f"{self.name}: {index} is not a valid index (weight_map is not a mapping)", "re-save the checkpoint")
        for key, value in weight_map.items():
            if not isinstance(value, str) or not value:
                raise MergeInputError(f"{self.name}: {index} maps {key!r} to {value!r}, not to a shard file name", "re-save the checkpoint")
        return weight_map

    def _open_safetensors(self, files: list[Path]) -> None:
        for f in files:
            entries, _ = read_header(f)
            for key, entry in entries.items():
                if self._index_map is not None and self._index_map.get(key) != f:
                    continue  # the index is authoritative for which shard holds a key
                self.entries[key] = entry
        if self._index_map is not None:
            missing = [k for k in self._index_map if k not in self.entries]
            if missing:
                raise MergeInputError(
                    f"{self.name}: {len(missing)} tensors listed in the index are absent from their shards (e.g. {missing[0]!r})",
                    "re-download the checkpoint",
                )
        self.shapes = {k: e.shape for k, e in self.entries.items()}
        self.dtypes = {k: e.dtype for k, e in self.entries.items()}

    def _open_pickle(self, files: list[Path], allow_pickle: bool) -> None:
        target = files[0]
        if not allow_pickle:
            raise MergeInputError(
                f"{self.name}: {target.name} is a pickle checkpoint, which can run code when loaded",
                "convert it to safetensors, or pass --allow-pickle (allow_pickle: true) if you trust it",
            )
        paths = [target]
        if target.name.endswith(".index.json"):
            weight_map = self._weight_map(target)
            paths = self.files = sorted({self.path / v for v in weight_map.values()})
        state: dict[str, torch.Tensor] = {}
        for p in paths:
            try:
                loaded = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise MergeInputError(f"{self.name}: cannot load {p.name} safely ({type(exc).__name__})", "convert it to safetensors") from None
            if not isinstance(loaded, dict):
                raise MergeInputError(f"{self.name}: {p.name} does not hold a state dict", "save model.state_dict()")
            state.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
        self._pickled = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}

    # ---- access ----------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.shapes)

    def read(self, key: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor into freshly owned memory (never a view of a shared mapping), or into `out`: any
        contiguous tensor of exactly the tensor's byte size, reused by a caller that reads many tensors (a fresh
        buffer costs a page fault per 4 KiB on first touch, more than the read itself from the page cache).
        `rows`: only the row block [start, stop) of its first dimension (stored contiguously: one read)."""
        shape = self.shapes[key] if rows is None else (rows[1] - rows[0], *self.shapes[key][1:])
        if rows is not None and not 0 <= rows[0] < rows[1] <= self.shapes[key][0]:
            raise ValueError(f"{key}: rows {rows} are outside its {self.shapes[key][0]} rows")
        entry_bytes = nbytes(shape, self.dtypes[key])
        if out is not None and (not out.is_contiguous() or out.numel() * out.element_size() != entry_bytes):
            raise ValueError(f"{key}: a read buffer must be contiguous and hold {entry_bytes} bytes")
        if self._pickled is not None:
            value = self._pickled[key] if rows is None else self._pickled[key][rows[0]:rows[1]]
            return value.clone() if out is None else out.view(value.dtype).view(value.shape).copy_(value)
        entry = self.entries[key]
        buf = torch.empty(entry_bytes, dtype=torch.uint8) if out is None else out.view(-1).view(torch.uint8)
        if entry_bytes == 0:
            return buf.view(entry.dtype).reshape(shape)
        fd = self._fds.get(entry.path)
        if fd is None:
            fd = self._fds[entry.path] = os.open(entry.path, os.O_RDONLY)
        view = memoryview(buf.numpy())
        start = entry.start + (0 if rows is None else rows[0] * (entry.nbytes // entry.shape[0]))
        done = 0
        while done < entry_bytes:
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise MergeInputError(f"{self.name}: {entry.path.name} ended while reading {key!r}", "re-download the checkpoint")
            done += n
        return buf.view(entry.dtype).reshape(shape)

    def nbytes(self, key: str) -> int:
        """Bytes of one stored tensor, from the header."""
        if self._pickled is not None:
            value = self._pickled[key]
            return value.numel() * value.element_size()
        return self.entries[key].nbytes

    def low_rank(self, key: str) -> None:
        """A full checkpoint's task vectors are dense (PEFT adapters give factors: workers/peft_adapter.py)."""
        return None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ModelCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
