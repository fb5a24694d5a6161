"""Tensor roles, decided by rules that are data: one entry per architecture, no per-family classes.

Roles:
- spectral:    2-D weight matrices inside repeated blocks (attention/MLP projections); SVD methods act on these.
- elementwise: every other float tensor that is merged (biases, norms, embeddings, patch convs, LM heads).
- head:        per-task classifier heads; never merged, kept per task.
- frozen:      buffers and integer tensors; copied from the base.
- tied:        a stored copy of another tensor (e.g. lm_head tied to the embedding); written with its source's value.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


class Role(str, enum.Enum):
    SPECTRAL = "spectral"
    ELEMENTWISE = "elementwise"
    HEAD = "head"
    FROZEN = "frozen"
    TIED = "tied"


BLOCK = r"(^|\.)(layer|layers|h|blocks|block)\.\d+\."


@dataclass(frozen=True)
class ArchitectureRules:
    """How to read one architecture's state dict. `prefixes` are what task models wrap the backbone in."""

    name: str
    model_types: tuple[str, ...]
    prefixes: tuple[str, ...] = ()
    head: tuple[str, ...] = (r"^(classifier|score)\.",)
    frozen: tuple[str, ...] = (r"position_ids$", r"inv_freq$", r"\.attn\.(masked_)?bias$", r"token_type_ids$")
    embeddings: tuple[str, ...] = (r"embed_tokens\.weight$", r"wte\.weight$", r"word_embeddings\.weight$", r"lm_head\.weight$")
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)  # copy -> candidate sources
    ties_word_embeddings_by_default: bool = True
    spectral_block: str = BLOCK


ARCHITECTURES: tuple[ArchitectureRules, ...] = (
    ArchitectureRules("vit", ("vit",), prefixes=("vit.",)),
    ArchitectureRules("clip_vision", ("clip_vision_model", "clip"), prefixes=("vision_model.",)),
    ArchitectureRules(
        "bert",
        ("bert",),
        prefixes=("bert.",),
        head=(r"^classifier\.", r"^cls\."),
    ),
    ArchitectureRules(
        "roberta",
        ("roberta", "xlm-roberta"),
        prefixes=("roberta.",),
        head=(r"^classifier\.", r"^lm_head\."),
        embeddings=(r"word_embeddings\.weight$",),
    ),
    ArchitectureRules(
        "gpt2",
        ("gpt2",),
        prefixes=("transformer.",),
        head=(r"^score\.",),
        # Conv1D stores Linear weights as (in, out). Every static method here is invariant to transposing a matrix
        # (SVD-based ones included: U diag(s) Vᵀ transposes with it), so no orientation flag is needed.
        tied={"lm_head.weight": ("transformer.wte.weight", "wte.weight")},
    ),
    ArchitectureRules(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3"),
        prefixes=("model.",),
        head=(r"^score\.",),
        tied={"lm_head.weight": ("model.embed_tokens.weight",)},
        ties_word_embeddings_by_default=False,
    ),
)


def rules_for(config: dict) -> ArchitectureRules:
    """Pick the rules for a config.json; unknown model types get generic rules with a warning."""
    model_type = config.get("model_type")
    for rules in ARCHITECTURES:
        if model_type in rules.model_types:
            return rules
    log.warning("unknown model_type %r: using generic tensor-role rules", model_type)
    return ArchitectureRules("generic", (model_type,) if model_type else ())


def _matches(patterns: tuple[str, ...], key: str) -> bool:
    return any(re.search(p, key) for p in patterns)


def is_head(rules: ArchitectureRules, key: str) -> bool:
    return _matches(rules.head, key)


def is_embedding(rules: ArchitectureRules, key: str) -> bool:
    return _matches(rules.embeddings, key)


def tied_source(rules: ArchitectureRules, key: str, keys: set[str], config: dict) -> str | None:
    """The key this one is a stored copy of, when the config ties them and both are stored."""
    if not config.get("tie_word_embeddings", rules.ties_word_embeddings_by_default):
        return None
    for source in rules.tied.get(key, ()):
        if source in keys:
            return source
    return None


def classify(rules: ArchitectureRules, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Role:
    """Role of one backbone tensor (heads and tied copies are decided by the planner, which sees all keys)."""
    if not dtype.is_floating_point or _matches(rules.frozen, key):
        return Role.FROZEN
    if is_head(rules, key):
        return Role.HEAD
    if len(shape) == 2 and key.endswith("weight") and re.search(rules.spectral_block, key) and not is_embedding(rules, key):
        return Role.SPECTRAL
    return Role.ELEMENTWISE
