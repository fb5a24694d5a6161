"""Zero-shot heads: score a bare CLIP image encoder (a `CLIPVisionModel` fine-tune with no classifier) on a task
through the pretrained CLIP model's text tower, as the CLIP merging papers and FusionBench evaluate it.

Per class c, T_c = normalise(mean_templates(normalise(text_projection(text_model(prompt))))); the image feature is
f = normalise(visual_projection(pooled image output)), with the PRETRAINED visual projection (fine-tunes leave it
untouched); logits = exp(logit_scale) · f · Tᵀ. The head is computed once per job from the full `CLIPModel`, cached in
the job directory under an identity (the CLIP model's content, class names, templates) and reused on resume. A task
with a zero-shot head is seen everywhere else as a `CLIPZeroShotClassifier` checkpoint (`ZeroShotTask`): the plan,
the adapters, the teachers, the evaluation and the publisher treat its head like any other task head, and the
published `heads/<task>.safetensors` carries its config with `id2label`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from rankmerge.workers.atomic_io import write_atomic
from rankmerge.workers.checkpoint_reader import Checkpoint, ModelCheckpoint
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.fingerprint import input_fingerprint

log = logging.getLogger(__name__)
# class names (in label order) and templates of the 8/14/20-task CLIP benchmarks, as data (see the file's "about")
BENCHMARK_TASKS = json.loads(Path(__file__).with_name("clip_tasks.json").read_text(encoding="utf-8"))
CLASSNAMES: dict[str, list[str]] = BENCHMARK_TASKS["classnames"]
TEMPLATES: dict[str, list[str]] = BENCHMARK_TASKS["templates"]
CACHE_DIR = "zero_shot"  # <job_dir>/zero_shot/<task>.safetensors
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # a task given by class names alone (FusionBench's default template)
HEAD_PREFIX = "classifier."
WEIGHT, PROJECTION = HEAD_PREFIX + "weight", HEAD_PREFIX + "visual_projection.weight"
CLIP_ENCODERS = ("clip_vision_model", "clip")  # model types a zero-shot head fits


class ZeroShot(BaseModel):
    """A task's head named instead of carried: a built-in dataset, or class names (a list or a file, one per line)
    with templates (`default`, the dataset's own, or a list with `{c}` for the class name)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(None, description="built-in class names and templates: " + ", ".join(CLASSNAMES))
    classnames: list[str] | Path | None = Field(None, description="class names in label order, or a text file of them")
    templates: Literal["default"] | list[str] = Field(
        "default", description="default: the dataset's own templates (else 'a photo of a {c}.'); or a list with {c}")

    @model_validator(mode="after")
    def _names(self) -> "ZeroShot":
        if self.dataset is None and self.classnames is None:
            raise ValueError("give `dataset` (one of: " + ", ".join(CLASSNAMES) + ") or `classnames`")
        if self.dataset is not None and self.dataset not in CLASSNAMES:
            raise ValueError(f"unknown dataset {self.dataset!r}; built in: {', '.join(CLASSNAMES)} (or give `classnames`)")
        if isinstance(self.templates, list) and (not self.templates or any("{c}" not in t for t in self.templates)):
            raise ValueError("every template must contain {c} (where the class name goes)")
        return self

    def resolved_classnames(self) -> list[str]:
        if isinstance(self.classnames, Path):
            try:
                names = [line.strip() for line in self.classnames.read_text().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise MergeInputError(f"class-name file {self.classnames} cannot be read ({type(exc).__name__})",
                                      "give a UTF-8 text file, one class name per line, in label order") from None
            if not names:
                raise MergeInputError(f"class-name file {self.classnames} is empty",
                                      "write one class name per line, in label order")
            return names
        return list(self.classnames if self.classnames is not None else CLASSNAMES[self.dataset])

    def resolved_templates(self) -> list[str]:
        if isinstance(self.templates, list):
            return list(self.templates)
        return list(TEMPLATES[self.dataset] if self.dataset is not None else DEFAULT_TEMPLATES)


class TaskHead(BaseModel):
    """`heads.<task>` in a job spec."""

    model_config = ConfigDict(extra="forbid")

    zero_shot: ZeroShot


# ---- the math -----------------------------------------------------------------------------------------------------
def class_embeddings(text_embeds: Tensor) -> Tensor:
    """[C, K, D] projected text embeddings (K templates per class) -> [C, D]: each normalised, averaged over the
    templates, normalised again (FusionBench's HFCLIPClassifier order)."""
    unit = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    mean = unit.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def task_config(encoder_config: dict, clip_config: dict, classnames: list[str]) -> dict:
    """The zero-shot task model's config.json: the fine-tuned encoder's vision config, the CLIP model's projection
    size, the class names as labels."""
    vision = dict(encoder_config.get("vision_config") or encoder_config)
    vision.update(model_type="clip_vision_model", architectures=["CLIPZeroShotClassifier"],
                  projection_dim=int(clip_config.get("projection_dim") or vision.get("projection_dim") or 512),
                  id2label={str(i): name for i, name in enumerate(classnames)},
                  label2id={name: i for i, name in enumerate(classnames)})
    return vision


# ---- computing and caching the head -------------------------------------------------------------------------------
@torch.no_grad()
def compute_head(clip: Any, tokenizer: Any, classnames: list[str], templates: list[str], batch: int = 256) -> dict[str, Tensor]:
    """The head's tensors from a pretrained `CLIPModel` and its tokenizer (prompts cut at the text tower's length),
    computed where `clip` is (every class × template prompt goes through the text tower); returned on the host."""
    device = clip.logit_scale.device
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]
    limit = clip.config.text_config.max_position_embeddings  # CLIP's 77 tokens
    embeds = []
    for start in range(0, len(prompts), batch):
        tokens = tokenizer(prompts[start : start + batch], padding=True, truncation=True, max_length=limit,
                           return_tensors="pt")
        pooled = clip.text_model(input_ids=tokens["input_ids"].to(device),
                                 attention_mask=tokens["attention_mask"].to(device)).pooler_output
        embeds.append(clip.text_projection(pooled).float())
    classes = class_embeddings(torch.cat(embeds).reshape(len(classnames), len(templates), -1))
    return {WEIGHT: (clip.logit_scale.float().exp() * classes).cpu().contiguous(),
            PROJECTION: clip.visual_projection.weight.float().cpu().contiguous()}


def load_clip(clip_dir: Path) -> tuple[Any, Any]:
    """The full pretrained CLIPModel (fp32, eval) and its tokenizer; a bare encoder or no tokenizer is one line."""
    from transformers import AutoTokenizer, CLIPModel

    config = clip_dir / "config.json"
    kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if kind != "clip":
        raise MergeInputError(f"zero-shot heads need the full pretrained CLIP model (text tower, projections, logit "
                              f"scale), but {clip_dir} is {kind or 'not a model folder'!s}",
                              "set zero_shot_model to the CLIPModel folder or id, e.g. openai/clip-vit-base-patch32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    except (OSError, ValueError) as exc:
        raise MergeInputError(f"zero-shot heads: {clip_dir} has no tokenizer ({str(exc).splitlines()[0][:100]})",
                              "save the CLIP model's tokenizer beside it (save_pretrained), or use the Hub folder") from None
    return CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval(), tokenizer


def head_identity(clip_weights: str, encoder_config: dict, zero_shot: ZeroShot) -> str:
    """What a cached head was computed from: the CLIP model's weights (fingerprint), class names, templates, and the
    encoder's config."""
    record = [clip_weights, zero_shot.resolved_classnames(), zero_shot.resolved_templates(), encoder_config]
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata ({} when the file is absent or unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError):
        return {}


def prepare_heads(heads: dict[str, TaskHead], models: dict[str, Path], clip_dir: Path, job_dir: Path,
                  device: torch.device = torch.device("cpu")) -> dict[str, Path]:
    """Compute each named head once per job on `device` (a resume reuses the cached file of the same identity); task ->
    file. The CLIP model is loaded only when a head is missing, and then once."""
    out: dict[str, Path] = {}
    with ModelCheckpoint(clip_dir, "zero_shot_model") as ck:
        clip_weights, clip_config = input_fingerprint(ck.files), ck.config
    clip = None
    for task, head in heads.items():
        with ModelCheckpoint(models[task], task) as encoder:
            config = encoder.config
        if config.get("model_type") not in CLIP_ENCODERS:
            raise MergeInputError(f"heads.{task}: a zero-shot head scores a CLIP image encoder, but {task!r} is "
                                  f"{config.get('model_type')!r}", f"remove heads.{task}, or give a CLIP fine-tune")
        path = job_dir / CACHE_DIR / f"{task}.safetensors"
        identity = head_identity(clip_weights, config, head.zero_shot)
        if _metadata(path).get("identity") == identity:
            log.info("zero-shot head of %r: reusing %s", task, path)
        else:
            if clip is None:
                model, tokenizer = load_clip(clip_dir)
                clip = (model.to(device), tokenizer)
            names = head.zero_shot.resolved_classnames()
            tensors = compute_head(*clip, names, head.zero_shot.resolved_templates())
            metadata = {"identity": identity, "config": json.dumps(task_config(config, clip_config, names), sort_keys=True)}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, save(tensors, metadata=metadata))
            log.info("zero-shot head of %r: %d classes from %s", task, len(names), clip_dir)
        out[task] = path
    return out


# ---- a task checkpoint seen with its zero-shot head ---------------------------------------------------------------
class ZeroShotTask:
    """A fine-tuned encoder's checkpoint plus its cached zero-shot head, read as one `CLIPZeroShotClassifier`
    checkpoint: the head's keys and config join the encoder's; everything else is the encoder's."""

    def __init__(self, encoder: Checkpoint, head_file: Path) -> None:
        try:
            self.head = load_file(str(head_file))
            self.config = json.loads(_metadata(head_file)["config"])
        except (OSError, ValueError, KeyError, SafetensorError):
            raise MergeInputError(f"zero-shot head {head_file} is missing or damaged",
                                  "run the job again (it is recomputed)") from None
        self.encoder = encoder
        # the head file is an input like the weights: a resume refuses a head computed from other inputs
        self.name, self.path, self.files = encoder.name, encoder.path, [*encoder.files, head_file]
        self._keys = [*(k for k in encoder.keys() if not k.startswith(HEAD_PREFIX)), *self.head]  # its own head replaced
        self.shapes = {k: tuple(self.head[k].shape) if k in self.head else encoder.shapes[k] for k in self._keys}
        self.dtypes = {k: self.head[k].dtype if k in self.head else encoder.dtypes[k] for k in self._keys}

    def keys(self) -> list[str]:
        return list(self._keys)

    def read(self, key: str, out: Tensor | None = None, rows: tuple[int, int] | None = None) -> Tensor:
        if key not in self.head:
            return self.encoder.read(key, out, rows)
        value = self.head[key] if rows is None else self.head[key][rows[0]:rows[1]]
        return value if out is None else out.view(-1).view(value.dtype).view(value.shape).copy_(value)

    def nbytes(self, key: str) -> int:
        return self.head[key].nbytes if key in self.head else self.encoder.nbytes(key)

    def low_rank(self, key: str) -> tuple[Tensor, Tensor] | None:
        """The encoder's LoRA factors (an adapter encoder); a head is never low-rank."""
        return None if key in self.head else self.encoder.low_rank(key)

    def close(self) -> None:
        self.encoder.close()

    def __enter__(self) -> "ZeroShotTask":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
