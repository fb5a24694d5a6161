"""Lazy reading of HF model directories: headers first, then one tensor at a time.

Tensors are read with positional reads into the caller's buffer (or fresh memory), not through a long-lived memory
map: mapped pages of every input file would otherwise count towards (and inflate) the process's resident memory as a
merge walks the files. `mapped` is the one exception, for a value used once and at once (a fine-tune minus the
base): a view of the page cache for the length of one `with` block, whose pages leave the process when it ends.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.safetensors_format import TensorEntry, read_header

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin.index.json", "pytorch_model.bin", "model.pt", "model.bin", "adapter_model.bin")


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
        self._maps: dict[Path, mmap.mmap] = {}
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

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into freshly owned memory (never a view of a shared mapping), or into `out`: any
        contiguous tensor of exactly the tensor's byte size, reused by a caller that reads many tensors (a fresh
        buffer costs a page fault per 4 KiB on first touch, more than the read itself from the page cache)."""
        entry_bytes = self.nbytes(key)
        if out is not None and (not out.is_contiguous() or out.numel() * out.element_size() != entry_bytes):
            raise ValueError(f"{key}: a read buffer must be contiguous and hold {entry_bytes} bytes")
        if self._pickled is not None:
            value = self._pickled[key]
            return value.clone() if out is None else out.view(value.dtype).view(value.shape).copy_(value)
        entry = self.entries[key]
        buf = torch.empty(entry.nbytes, dtype=torch.uint8) if out is None else out.view(-1).view(torch.uint8)
        if entry.numel == 0:
            return buf.view(entry.dtype).reshape(entry.shape)
        fd = self._fd(entry.path)
        view = memoryview(buf.numpy())
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.start + done)
            if n <= 0:
                raise MergeInputError(f"{self.name}: {entry.path.name} ended while reading {key!r}", "re-download the checkpoint")
            done += n
        return buf.view(entry.dtype).reshape(entry.shape)

    @contextmanager
    def mapped(self, key: str) -> Iterator[torch.Tensor | None]:
        """The stored tensor as a view of its file's pages in the page cache, for one `with` block: no copy, unlike
        `read` (about half the cost of forming a task vector from a warm cache). None where there is no such view
        (a pickle, an empty tensor): read it then. Read-only by contract; the mapping is private, so not even a
        stray write could reach the file. When the block ends the pages leave this process, which so holds one
        tensor's pages at a time. A file cut shorter since it was opened is a one-line error here rather than a
        SIGBUS on a page past its end."""
        entry = None if self._pickled is not None else self.entries[key]
        if entry is None or entry.numel == 0:
            yield None
            return
        fd = self._fd(entry.path)
        if os.fstat(fd).st_size < entry.end:
            raise MergeInputError(f"{self.name}: {entry.path.name} became shorter while it was being read",
                                  "leave the inputs alone until the job ends, then run it again")
        pages = self._maps.get(entry.path)
        if pages is None:
            pages = self._maps[entry.path] = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            yield torch.frombuffer(pages, dtype=entry.dtype, count=entry.numel, offset=entry.start).view(entry.shape)
        finally:
            first = entry.start - entry.start % mmap.PAGESIZE
            pages.madvise(mmap.MADV_DONTNEED, first, entry.end - first)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

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
        for pages in self._maps.values():
            try:
                pages.close()
            except BufferError:  # a view of it is still alive somewhere: the mapping goes with the last one
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ModelCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
