"""PEFT LoRA adapters as fine-tuned inputs: a folder with adapter_config.json + adapter_model.safetensors on the base.

An `AdapterCheckpoint` looks like a `ModelCheckpoint` of the fine-tuned model (the base's keys, shapes and config),
so the planner, every static method and the adaptive merges take it unchanged, and full and adapter inputs mix
freely. A LoRA-adapted weight reads as θ0 + s·B·A (s = lora_alpha / r, or lora_alpha / √r with rsLoRA; per-module r
and alpha from rank_pattern / alpha_pattern; transposed for fan_in_fan_out layers such as GPT-2's Conv1D), every
other tensor as the base's, and modules_to_save as the adapter's full tensors (an adapted embedding's stored pre-LoRA
weight, which PEFT saves whole, is that module's starting point). `low_rank(key)` gives the task vector
as two factors (left m×r, right r×n), from which the spectral methods take an exact SVD without the m×n SVD.

Only plain LoRA is read: DoRA magnitudes, LoRA biases, LoHa/LoKr/IA³ and the other PEFT types, and LoRA on
convolutions or raw parameters stop with one line rather than merging something else.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint, factor_rows
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.roles import rules_for

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer.weight"
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices")
USE_PLAIN_LORA = "merge it into its base (merge_and_unload) and pass that folder, or train a plain LoRA adapter"


def is_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: where its factors are and how they make the task vector."""

    a_key: str
    b_key: str
    scaling: float
    transposed: bool  # the weight is stored (in, out): fan_in_fan_out layers and embeddings


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / √r with rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_factors(a: Tensor, b: Tensor, scaling: float, transposed: bool) -> tuple[Tensor, Tensor]:
    """The task vector s·B·A (or its transpose) as left @ right in fp32, the scale folded into the smaller factor."""
    left, right = b.float() * scaling, a.float()
    return (right.T, left.T) if transposed else (left, right)


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """rank_pattern / alpha_pattern lookup as PEFT matches it: a key names the module path or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|modules_to_save)\.([^.]+)(?=\.|$)")


def without_adapter_name(key: str) -> tuple[str, str | None]:
    """A state-dict key as save_pretrained writes it: `….lora_A.default.weight` -> `….lora_A.weight` (and the name);
    `….modules_to_save.default.weight` -> `….weight`."""
    match = ADAPTER_NAME.search(key)
    if match is None or (match.group(1) != "modules_to_save" and match.end() == len(key) and "embedding" not in match.group(1)):
        return key, None
    kept = "" if match.group(1) == "modules_to_save" else "." + match.group(1)
    return key[: match.start()] + kept + key[match.end():], match.group(2)


def read_adapter_config(path: Path, name: str) -> dict:
    """adapter_config.json, checked: only plain LoRA adapters are merged."""
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise MergeInputError(f"{name}: {path / ADAPTER_CONFIG} is not valid JSON ({exc.msg})", "re-save the adapter") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise MergeInputError(f"{name}: {peft_type or 'unknown'} adapters are not supported (only LoRA)", USE_PLAIN_LORA)
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise MergeInputError(f"{name}: LoRA adapters with {option} are not supported", USE_PLAIN_LORA)
    if not isinstance(config.get("r"), int) or config["r"] < 1 or "lora_alpha" not in config:
        raise MergeInputError(f"{name}: {ADAPTER_CONFIG} has no valid r / lora_alpha", "re-save the adapter with PEFT")
    return config


class AdapterCheckpoint:
    """A LoRA adapter read as the fine-tuned model it makes with `base` (a `Checkpoint`, like `ModelCheckpoint`)."""

    def __init__(self, path: str | Path, name: str, base: ModelCheckpoint, allow_pickle: bool = False) -> None:
        self.path, self.name, self.base = Path(path), name, base
        self.adapter_config = read_adapter_config(self.path, name)
        self._check_base_name()
        if not any((self.path / f).is_file() for f in ADAPTER_WEIGHTS):
            raise MergeInputError(f"{name}: adapter folder {self.path} has no {ADAPTER_WEIGHTS[0]}", "copy the whole adapter folder")
        self.weights = ModelCheckpoint(self.path, name, allow_pickle)  # adapter_model.safetensors (or .bin if allowed)
        self.files = self.weights.files + [self.path / ADAPTER_CONFIG]
        self.config = base.config
        self.lora: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}  # key -> adapter key of a modules_to_save tensor
        self._stored_is_base: dict[str, bool] = {}  # key in `full` -> whether its stored weight is the base's
        self._map_keys()
        self.shapes = dict(base.shapes)
        self.dtypes = dict(base.dtypes)
        for key, src in self.full.items():
            self.shapes[key], self.dtypes[key] = self.weights.shapes[src], self.weights.dtypes[src]
        for key in self.lora:
            self.dtypes[key] = torch.float32  # θ0 + s·B·A is formed in fp32

    def _check_base_name(self) -> None:
        """A differing base name warns: an id and a local copy of it legitimately differ; shapes are checked anyway."""
        named = self.adapter_config.get("base_model_name_or_path")
        if named and Path(str(named)).name != self.base.path.name:
            log.warning("%s: the adapter was trained on %r but is merged on the base %s", self.name, named, self.base.path)

    def _base_key(self, module_key: str) -> str | None:
        """The base's name for a key of the wrapped model (the base may lack the task model's prefix, or add one)."""
        keys = self.base.shapes
        if module_key in keys:
            return module_key
        for prefix in rules_for(self.base.config).prefixes:
            if module_key.startswith(prefix) and module_key[len(prefix):] in keys:
                return module_key[len(prefix):]
            if prefix + module_key in keys:
                return prefix + module_key
        return None

    def _map_keys(self) -> None:
        cfg = self.adapter_config
        factors: dict[str, dict[str, str]] = {}
        names: set[str] = set()
        for key in self.weights.keys():
            inner, name = without_adapter_name(key.removeprefix(PEFT_PREFIX))
            names |= {name} if name else set()
            if len(names) > 1:
                raise MergeInputError(f"{self.name}: the adapter file holds several adapters ({', '.join(sorted(names))})",
                                      "save each adapter to its own folder (save_pretrained does)")
            if ".original_module." in inner:
                continue  # modules_to_save keeps the base's copy beside the trained one
            if inner.endswith(BASE_LAYER):  # an adapted embedding's own pre-LoRA weight (PEFT saves it whole)
                self._map_full(key, inner[: -len(BASE_LAYER)] + ".weight")
                continue
            suffix = next((s for s in LORA_SUFFIXES if inner.endswith(s)), None)
            if suffix is None:
                if "lora_" in inner or "magnitude" in inner:
                    raise MergeInputError(f"{self.name}: adapter tensor {key!r} is not a LoRA A/B factor", USE_PLAIN_LORA)
                self._map_full(key, inner)
                continue
            factors.setdefault(inner[: -len(suffix)], {})[LORA_SUFFIXES[suffix]] = key
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise MergeInputError(f"{self.name}: {module!r} has only lora_{next(iter(pair))}", "re-save the adapter with PEFT")
            embedding = pair["A"].endswith("lora_embedding_A")
            target = self._base_key(module + ".weight")
            if target is None:
                raise MergeInputError(f"{self.name}: the adapter adapts {module!r}, which the base does not have",
                                      "merge the adapter on the model it was trained on")
            a_shape, b_shape = self.weights.shapes[pair["A"]], self.weights.shapes[pair["B"]]
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise MergeInputError(f"{self.name}: LoRA on {module!r} is not on a linear layer", USE_PLAIN_LORA)
            shape = self.base.shapes[target]
            transposed = embedding or bool(cfg.get("fan_in_fan_out")) and shape == (a_shape[1], b_shape[0])
            expected = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
            if expected != shape or a_shape[0] != b_shape[1]:
                raise MergeInputError(f"{self.name}: LoRA factors of {module!r} ({list(b_shape)} · {list(a_shape)}) do not "
                                      f"make its base shape {list(shape)}", "merge the adapter on the model it was trained on")
            rank = a_shape[0]
            declared = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            if declared != rank:
                raise MergeInputError(f"{self.name}: {module!r} has rank {rank} but {ADAPTER_CONFIG} says {declared}",
                                      "re-save the adapter with PEFT")
            alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            self.lora[target] = LoraModule(pair["A"], pair["B"], lora_scaling(alpha, rank, bool(cfg.get("use_rslora"))), transposed)

    def _map_full(self, key: str, inner: str) -> None:
        """A modules_to_save tensor: the fine-tune's full value (its task vector is dense), or a new head."""
        target = self._base_key(inner)
        if target is not None and self.weights.shapes[key] != self.base.shapes[target]:
            raise MergeInputError(f"{self.name}: {inner!r} is {list(self.weights.shapes[key])} in the adapter but "
                                  f"{list(self.base.shapes[target])} in the base", "merge the adapter on the model it was trained on")
        self.full[target or inner] = key

    # ---- access (the Checkpoint interface) ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.shapes)

    def low_rank(self, key: str) -> tuple[Tensor, Tensor] | None:
        """The task vector of `key` as (left m×r, right r×n) fp32 factors; None where it is not low-rank (also where
        the adapter stores a pre-LoRA weight that differs from the base's: compared once per key, as a merge in row
        blocks asks for every block)."""
        if key in self.full:
            if key not in self._stored_is_base:
                self._stored_is_base[key] = torch.equal(self.weights.read(self.full[key]), self.base.read(key))
            if not self._stored_is_base[key]:
                return None
        return self._factors(key)

    def _factors(self, key: str) -> tuple[Tensor, Tensor] | None:
        module = self.lora.get(key)
        if module is None:
            return None
        return lora_factors(self.weights.read(module.a_key), self.weights.read(module.b_key), module.scaling, module.transposed)

    def read(self, key: str, out: Tensor | None = None, rows: tuple[int, int] | None = None) -> Tensor:
        """The fine-tuned tensor (or its `rows`): the adapter's stored weight (modules_to_save, an embedding's
        pre-LoRA weight) or the base's, plus s·B·A (in fp32) where the module is adapted; into `out` when given."""
        start = self.weights.read(self.full[key], rows=rows) if key in self.full else self.base.read(key, rows=rows)
        factors = factor_rows(self._factors(key), rows)
        value = start if factors is None else torch.addmm(start.float(), *factors)
        return value if out is None else out.view(-1).view(value.dtype).view(value.shape).copy_(value)

    def nbytes(self, key: str) -> int:
        return math.prod(self.shapes[key]) * self.dtypes[key].itemsize

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> "AdapterCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | Path, name: str, base: ModelCheckpoint, allow_pickle: bool = False) -> Checkpoint:
    """A fine-tuned input: a full checkpoint folder, or a PEFT LoRA adapter folder on `base`."""
    if is_adapter(Path(path)):
        return AdapterCheckpoint(path, name, base, allow_pickle)
    return ModelCheckpoint(path, name, allow_pickle)
