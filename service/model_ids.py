"""Models and datasets given as Hugging Face ids (`org/name`), found in the local Hugging Face cache without any
network access.

A local folder always wins: `org/name` is a model id only when no such folder exists (relative to the current
directory for flags, to the spec's folder in a spec). Write `./org/name` to mean a local folder only. The id resolves
to the snapshot `refs/main` points at in the cache (`$HF_HUB_CACHE`, default `~/.cache/huggingface/hub`), the same
folder `from_pretrained(..., local_files_only=True)` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)


def is_model_id(text: str) -> bool:
    """`org/name` as the Hub spells ids (one slash, letters, digits, `-_.`); `./x/y`, `../x` and absolute paths are
    never ids."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def cached_model(model_id: str, field: str, repo_type: str = "model") -> Path:
    """The cached snapshot folder of `model_id` (a dataset's with repo_type="dataset"); never downloads. Not cached:
    one line saying how to fetch it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(model_id, repo_type=repo_type, local_files_only=True))
    except LocalEntryNotFoundError:
        flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
        raise MergeInputError(f"{field}: {model_id!r} is not a local folder, and {repo_type} {model_id} is not in the "
                              f"Hugging Face cache ({constants.HF_HUB_CACHE})",
                              f"fetch it with `hf download {model_id}{flag}` (or set HF_HUB_CACHE to the cache that holds "
                              f"it), or fix the path") from None
    log.info("%s: %s %s from the Hugging Face cache at %s", field, repo_type, model_id, path)
    return path


def resolve_model_ref(text: str, root: Path, field: str, repo_type: str = "model") -> str:
    """`text` unchanged when it is a path (existing or not); the cached snapshot's path when it is an `org/name` id
    with no local folder of that name under `root`."""
    if not is_model_id(text) or (root / text).exists():
        return text
    return str(cached_model(text, field, repo_type))


def resolve_spec_models(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """A raw job spec with its `base`, `zero_shot_model`, `models` and `tta.data` ids resolved (other fields and
    non-string values untouched)."""
    data = dict(data)
    if isinstance(data.get("base"), str):
        data["base"] = resolve_model_ref(data["base"], root, "base")
    if isinstance(data.get("zero_shot_model"), str):
        data["zero_shot_model"] = resolve_model_ref(data["zero_shot_model"], root, "zero_shot_model")
    if isinstance(data.get("models"), dict):
        data["models"] = {name: resolve_model_ref(path, root, f"models.{name}") if isinstance(path, str) else path
                          for name, path in data["models"].items()}
    tta = data.get("tta")
    if isinstance(tta, dict) and isinstance(tta.get("data"), dict):  # Hugging Face datasets in the cache
        data["tta"] = {**tta, "data": {name: resolve_model_ref(path, root, f"tta.data.{name}", "dataset")
                                       if isinstance(path, str) else path for name, path in tta["data"].items()}}
    return data
