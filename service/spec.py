"""The merge job spec: a pydantic model loaded from YAML (or built from CLI flags), validated cheaply and completely."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rankmerge.service.model_ids import resolve_spec_models
from rankmerge.workers.checkpoint_writer import parse_size
from rankmerge.workers.device import DEVICE_HELP, check_setting
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods.registry import METHODS, nonfinite_bound_error, parse_params, validate_params
from rankmerge.workers.tta.params import ADAPTIVE_METHODS, TTAConfig
from rankmerge.workers.tta.sources import Sources
from rankmerge.workers.zero_shot import CACHE_DIR, TaskHead

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_TASK_NAME = 100  # names become file names (heads/<task>.safetensors): stay well inside the usual 255-byte limit


class Resources(BaseModel):
    """How an adaptive job is spread over a Ray cluster (`--executor ray`); the local executor ignores it.

    Not part of the spec's identity: a preempted job may resume on a cluster of another shape.
    """

    model_config = ConfigDict(extra="forbid")

    shards: int = Field(1, ge=1, description="SpectralShard actors; tensors are split between them by SVD cost")
    workers: int = Field(1, ge=1, description="EntropyWorker ranks in the data-parallel group (tta.batch_size must divide by it)")
    partition: Literal["replicated", "zero3"] = Field("replicated", description="zero3: DeepSpeed ZeRO-3 partitioned model (LLM scale)")
    cpus_per_shard: float = Field(1.0, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_shard: float = Field(0.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class MergeJob(BaseModel):
    """A static merge: one base checkpoint, T fine-tuned checkpoints of it, one method."""

    model_config = ConfigDict(extra="forbid")

    base: Path = Field(description="HF directory of the pretrained checkpoint the models were fine-tuned from")
    models: dict[str, Path] = Field(description="task name -> HF directory of the model fine-tuned on that task")
    method: str = Field(description="static: " + ", ".join(METHODS) + "; adaptive (needs `tta`): " + ", ".join(ADAPTIVE_METHODS))
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters (see `rankmerge schema --method M`)")
    output: Path = Field(description="output directory; written atomically")
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="default: each tensor's input dtype")
    overwrite: bool = False
    allow_pickle: bool = Field(False, description="allow .bin/.pt pickle checkpoints (loaded with weights_only=True)")
    max_shard_size: str = Field("2GB", description="largest output shard, e.g. 500MB, 5GB")
    tta: TTAConfig | None = Field(None, description="test-time adaptation (adaptive methods only)")
    job_dir: Path | None = Field(None, description="checkpoints and job state; default: <output>.job beside the output")
    resources: Resources = Field(default_factory=Resources, description="actors and devices for `--executor ray`")
    heads: dict[str, TaskHead] = Field(default_factory=dict, description="task name -> a head computed for it instead of "
                                       "its model's own: `zero_shot` (CLIP image encoders without a classifier)")
    zero_shot_model: Path | None = Field(None, description="the full pretrained CLIPModel (folder or cached Hub id) the "
                                                           "zero-shot heads are computed from; default: base")
    device: str = Field("auto", description=f"where the tensor math runs: {DEVICE_HELP}; not part of the job's identity "
                                            "(a job resumes on another device)")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    @property
    def resolved_job_dir(self) -> Path:
        return self.job_dir if self.job_dir is not None else self.output.parent / f"{self.output.name}.job"

    @property
    def sources(self) -> Sources:
        heads = {task: self.resolved_job_dir / CACHE_DIR / f"{task}.safetensors" for task in self.heads}
        return Sources(self.base, dict(self.models), self.allow_pickle, self.out_dtype, heads)

    @property
    def clip_model(self) -> Path:
        """Where the zero-shot heads come from."""
        return self.zero_shot_model if self.zero_shot_model is not None else self.base

    def spec_hash(self) -> str:
        """Identity of everything that determines the result (not where it is written or whether to overwrite)."""
        data = self.model_dump(mode="json", exclude={"overwrite", "output", "job_dir", "max_shard_size", "resources", "device"})
        for name in ("heads", "zero_shot_model"):  # unset, they leave the identity of jobs written before them unchanged
            if not data[name]:
                del data[name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, Path]) -> dict[str, Path]:
        if not models:
            raise ValueError("needs at least one fine-tuned model")
        for name in models:
            if len(name) > MAX_TASK_NAME:
                raise ValueError(f"task name {name[:20]!r}… is {len(name)} characters long; use at most {MAX_TASK_NAME}")
            if not TASK_NAME.match(name):
                raise ValueError(f"task name {name!r} must be ASCII letters (a-z, A-Z), digits, '_', '.', '-', "
                                 "starting with a letter or digit")
        return models

    @field_validator("method")
    @classmethod
    def _method(cls, method: str) -> str:
        if method not in METHODS and method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown method {method!r}; use one of: {', '.join([*METHODS, *ADAPTIVE_METHODS])}")
        return method

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        return check_setting(device)

    @field_validator("max_shard_size")
    @classmethod
    def _shard(cls, size: str) -> str:
        try:
            if parse_size(size) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{size!r} is not a size like 500MB or 2GB") from None
        return size

    @model_validator(mode="after")
    def _params(self) -> "MergeJob":
        unknown = sorted(set(self.heads) - set(self.models))
        if unknown:
            raise ValueError(f"heads names tasks that are not in models: {unknown}")
        if self.method in ADAPTIVE_METHODS:
            if self.tta is None:
                raise ValueError(f"method {self.method} adapts at test time and needs a `tta:` block with data per task")
            parse_adaptive_params(self.method, self.params)
            if self.tta.batch_size % self.resources.workers:
                raise ValueError(f"tta.batch_size {self.tta.batch_size} must be a multiple of resources.workers {self.resources.workers}")
        elif METHODS[self.method].needs_data:
            if self.tta is None:
                raise ValueError(f"method {self.method} computes each task model's input statistics from unlabeled data: "
                                 "add a `tta:` block with `data:` naming a file or image folder per task")
            parse_params(self.method, self.params, len(self.models))
        else:
            if self.tta is not None:
                raise ValueError(f"method {self.method} is static: remove the `tta:` block or use adarank/adamerging")
            parse_params(self.method, self.params, len(self.models))
        if self.tta is not None:
            missing = sorted(set(self.models) - set(self.tta.data))
            extra = sorted(set(self.tta.data) - set(self.models))
            if missing or extra:
                raise ValueError(f"tta.data must name exactly the tasks in models (missing {missing}, unknown {extra})")
        return self

    def resolved(self, root: Path) -> "MergeJob":
        """Paths relative to the spec file's folder, made absolute."""
        fix = lambda p: resolve_path(p if p.is_absolute() else (root / p))  # noqa: E731
        update = {"base": fix(self.base), "output": fix(self.output), "models": {k: fix(v) for k, v in self.models.items()}}
        if self.job_dir is not None:
            update["job_dir"] = fix(self.job_dir)
        if self.zero_shot_model is not None:
            update["zero_shot_model"] = fix(self.zero_shot_model)
        update["heads"] = {task: _resolved_head(head, fix) for task, head in self.heads.items()}
        if self.tta is not None:
            update["tta"] = self.tta.model_copy(update={"data": {k: fix(v) for k, v in self.tta.data.items()}})
        return self.model_copy(update=update)


def _resolved_head(head: TaskHead, fix: Callable[[Path], Path]) -> TaskHead:
    """A class-name file, relative to the spec's folder, made absolute."""
    names = head.zero_shot.classnames
    if not isinstance(names, Path):
        return head
    return head.model_copy(update={"zero_shot": head.zero_shot.model_copy(update={"classnames": fix(names)})})


def input_paths(job: MergeJob) -> list[tuple[str, Path]]:
    """Every input the job reads, named by its spec field: base, models.<task>, tta.data.<task>."""
    paths = [("base", job.base), *((f"models.{name}", path) for name, path in job.models.items())]
    if job.zero_shot_model is not None:
        paths.append(("zero_shot_model", job.zero_shot_model))
    paths += [(f"heads.{name}.zero_shot.classnames", head.zero_shot.classnames) for name, head in job.heads.items()
              if isinstance(head.zero_shot.classnames, Path)]
    if job.tta is not None:
        paths += [(f"tta.data.{name}", path) for name, path in job.tta.data.items()]
    return paths


def check_inputs_exist(job: MergeJob, origin: Callable[[str], str]) -> None:
    """Refuse a missing input while it is still known where its path was written (`origin(field)`: a flag or the
    spec file); the readers that open it later only see a path."""
    for field, path in input_paths(job):
        if not path.exists():
            raise MergeInputError(f"{field}: path {path} does not exist", f"check {origin(field)}")


def resolve_path(path: Path) -> Path:
    """Absolute path with symlinks followed; a symlink loop is a user mistake, not a crash."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError up to Python 3.12, OSError (ELOOP) after
        raise MergeInputError(f"path {path} cannot be resolved ({exc})", "replace the symlink loop with a real path") from None


def parse_adaptive_params(method: str, raw: dict[str, Any]):
    return validate_params(method, ADAPTIVE_METHODS[method], raw)


def job_from_dict(data: dict[str, Any], root: Path) -> MergeJob:
    data = resolve_spec_models(data, root)  # `org/name` ids from the local Hugging Face cache
    try:
        return MergeJob.model_validate(data).resolved(root)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "spec"
        msg = "it must be a finite number" if nonfinite_bound_error(err) else err["msg"].removeprefix("Value error, ")
        raise MergeInputError(f"job spec field {where!r}: {msg}", "fix the spec (see `rankmerge schema`)") from None
    except MergeInputError:
        raise


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML silently keeps the last one: a lost task)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise MergeInputError(f"duplicate key {key!r} in the job spec (line {key_node.start_mark.line + 1}): YAML would keep only the last",
                                  f"give {key!r} once (task names must be unique)")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_job_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"job spec {path} does not exist", "check the path")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise MergeInputError(f"job spec {path} is not valid YAML ({str(exc).splitlines()[0]})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise MergeInputError(f"job spec {path} is not a mapping", "write it as `key: value` lines (see `rankmerge schema`)")
    return data
