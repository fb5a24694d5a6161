"""The output's README.md: a Hugging Face model card saying what was merged, from what, and how.

The Hub and `huggingface_hub.ModelCard` read the YAML front matter (`base_model`, `base_model_relation: merge`,
`library_name`, `tags`); the inputs, method and parameters sit beside them so the card alone reproduces the merge.
It is written through the output writer, so it is published atomically with the weights it describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

import yaml

from rankmerge.workers.checkpoint_writer import StreamingCheckpointWriter

CARD_NAME = "README.md"


def card_metadata(base: Path, models: dict[str, Path], method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "base_model": str(base),
        "base_model_relation": "merge",
        "library_name": "rankmerge",
        "tags": ["rankmerge", "merge", method],
        "models": {name: str(path) for name, path in models.items()},
        "method": method,
        "parameters": params,
    }


def model_card(base: Path, models: dict[str, Path], method: str, params: dict[str, Any], heads: Collection[str] = ()) -> str:
    """Front matter plus a short body. `heads`: the tasks whose own classifier head is in heads/<task>.safetensors —
    named, because `from_pretrained` on the folder gets the base's config and no task's head."""
    front = yaml.safe_dump(card_metadata(base, models, method, params), sort_keys=False, allow_unicode=True)
    rows = "\n".join(f"| `{name}` | `{path}` | {f'`heads/{name}.safetensors`' if name in heads else '—'} |"
                      for name, path in models.items())
    return (f"---\n{front}---\n\n# Merged model\n\n"
            f"Merged by rankmerge with `{method}` from the base model `{base}` and {len(models)} fine-tuned model(s):\n\n"
            f"| task | fine-tuned model | task head |\n|---|---|---|\n{rows}\n\n"
            "The merged backbone loads with `AutoModel.from_pretrained` on this folder; task heads are never merged. "
            "One task's model, with its head and labels: `rankmerge export-task <this folder> <task> --out DIR`, or "
            "`load_task_model(<this folder>, <task>)` in Python. Per-tensor details: `merge_report.json`.\n")


def write_model_card(writer: StreamingCheckpointWriter, base: Path, models: dict[str, Path], method: str,
                     params: dict[str, Any], heads: Collection[str] = ()) -> None:
    writer.write_side_file(CARD_NAME, model_card(base, models, method, params, heads).encode())
