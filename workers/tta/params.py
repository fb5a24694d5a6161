"""Parameters of the adaptive methods and of the test-time-adaptation loop (pydantic: schema and range checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from rankmerge.workers.methods.registry import (
    SVD_FIELDS,
    MergeContext,
    Params,
    SpectralMethod,
    TaskVectorMethod,
    make_method,
    parse_params,
    spectral_methods,
)
from rankmerge.workers.tta.engine import AdaptiveOptions
from rankmerge.workers.tta.state import StateOptions

# The vocabulary AdaRank specs used before `base` named any spectral method: factorization -> (method, its scale
# parameter, what the factorization fixed, the top-level parameters it read). Old specs parse to the same job.
LEGACY_FACTORIZATIONS: dict[str, tuple[str, str, dict[str, Any], tuple[str, ...]]] = {
    "ta": ("ta_svd", "lambda", {"rho": 1.0}, ()),
    "cart": ("cart", "lambda", {}, ("rho",)),
    "tsv_m": ("tsv_m", "alpha", {}, ()),
    "iso_cts": ("iso_cts", "alpha", {}, ("common_fraction",)),
}
LEGACY_SHARED = ("rho", "common_fraction")  # top-level parameters every old spec accepted (read by one factorization)


def upgrade_legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """`factorization: cart, lambda: 2.3, rho: 0.16, svd: ...` -> `base: cart, base_params: {lambda: 2.3, rho: 0.16, svd: ...}`."""
    legacy = set(raw) & {"factorization", "lambda", *LEGACY_SHARED, *SVD_FIELDS}
    if not legacy or "base" in raw or "base_params" in raw:
        return raw
    factorization = raw.get("factorization", "ta")
    if factorization not in LEGACY_FACTORIZATIONS:
        raise ValueError(f"unknown factorization {factorization!r}: name the spectral method as `base` instead")
    name, scale, fixed, read = LEGACY_FACTORIZATIONS[factorization]
    rest = {k: v for k, v in raw.items() if k not in legacy}
    moved = {k: raw[k] for k in (*read, *SVD_FIELDS) if k in raw}
    if raw.get("lambda") is not None:
        moved[scale] = raw["lambda"]
    return {**rest, "base": name, "base_params": {**fixed, **moved}}


class AdaRankParams(Params):
    """AdaRank: learnable binary masks over the singular components of any spectral method, plus λ per task × tensor."""

    base: str = Field("ta_svd", description="the spectral method whose components get masks: " + ", ".join(spectral_methods()))
    base_params: dict[str, Any] = Field(
        {}, description="its parameters (see `rankmerge schema --method NAME`); unset ones start from "
                                          "AdaRank's start for that method (ta_svd: rho 1, i.e. task arithmetic; cart: "
                                          "lambda 2.3, rho 0.16), else the method's defaults")
    temperature: float = Field(10.0, gt=0.0, description="mask temperature τ_m of σ(L/τ_m)")
    mask_range: float | None = Field(None, gt=0.0, le=1.0, description="learn masks only over each task's top fraction of components")
    max_rank: int | None = Field(None, ge=1, description="keep at most this many components per task vector (memory cap)")
    learn_lambda: bool = True
    learn_masks: bool = True
    factor_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the stored factors and of the elementwise task-vector stacks")
    vocab: Literal["auto", "adapt", "static"] = Field(
        "auto", description="token embeddings and untied LM heads: adapt (λ learned over T stacked task vectors) or static "
                            "(merged once with λ0, not adapted); auto: static for causal LMs — their LM head is the classifier "
                            "the entropy would sharpen, and each stack is T × vocab × hidden — adapt otherwise")
    cache_masked: bool | Literal["auto"] = Field("auto", description="cache each task's masked matrix (no merge GEMM in the forward, T·m·n fp32 more per tensor); auto: only where the cache is no larger than the tensor's factors")

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, raw: Any) -> Any:
        return upgrade_legacy(raw) if isinstance(raw, dict) else raw

    @field_validator("base")
    @classmethod
    def _spectral(cls, name: str) -> str:
        if name not in spectral_methods():
            raise ValueError(f"{name!r} is not a spectral method; use one of: {', '.join(spectral_methods())}")
        return name

    @model_validator(mode="after")
    def _resolve_base(self) -> "AdaRankParams":
        """The base's full parameters (its defaults filled in), validated by its own schema."""
        start = spectral_methods()[self.base].adaptive_defaults
        self.base_params = parse_params(self.base, {**start, **self.base_params}).model_dump(by_alias=True)
        return self

    def method(self, ctx: MergeContext) -> SpectralMethod:
        return make_method(self.base, self.base_params, ctx)

    def state_options(self, columns: list[int] | None, static: frozenset[str]) -> StateOptions:
        return StateOptions(getattr(torch, self.factor_dtype), self.max_rank, self.mask_range,
                            None if columns is None else tuple(columns), static)

    def adaptive_options(self, lr: float) -> AdaptiveOptions:
        return AdaptiveOptions(self.temperature, self.learn_lambda, self.learn_masks, None, lr, self.cache_masked)

    def static_twin(self) -> tuple[str, dict[str, Any]]:
        """The static job this adaptation equals at step 0."""
        return self.base, self.base_params


class AdaMergingParams(Params):
    """AdaMerging (layer-wise): λ per task × tensor over plain task vectors."""

    lambda_: float = Field(0.3, alias="lambda", ge=-10.0, le=10.0, description="initial λ")
    clamp: bool = Field(False, description="clamp λ to [0, 1] in the forward, as the original AdaMerging code")

    def method(self, ctx: MergeContext) -> TaskVectorMethod:
        return make_method(*self.static_twin(), ctx)

    def state_options(self, columns: list[int] | None, static: frozenset[str]) -> StateOptions:
        return StateOptions(columns=None if columns is None else tuple(columns), static=static)

    def adaptive_options(self, lr: float) -> AdaptiveOptions:
        return AdaptiveOptions(learn_lambda=True, learn_masks=False, clamp=(0.0, 1.0) if self.clamp else None, lr=lr)

    def static_twin(self) -> tuple[str, dict[str, Any]]:
        return "task_arithmetic", {"lambda": self.lambda_}


AdaptiveParams = AdaRankParams | AdaMergingParams
ADAPTIVE_METHODS: dict[str, type[Params]] = {"adarank": AdaRankParams, "adamerging": AdaMergingParams}


class TTAConfig(Params):
    """The test-time-adaptation loop. Data: one .safetensors/.npz per task (see workers/tta/data.py)."""

    data: dict[str, Path] = Field(description="task name -> .safetensors/.npz/.jsonl file or image folder (labels, if present, only evaluate)")
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1)
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    evaluate: bool = Field(True, description="report per-task accuracy where the data has labels")
    eval_batch_size: int = Field(256, ge=1)
    max_length: int = Field(128, ge=1, description="token length for .jsonl text data")
    objective: Literal["distill", "entropy", "infomax"] = Field(
        "distill", description="distill: KL from each task's own fine-tuned model on the same unlabeled inputs (teacher "
                               "outputs computed once before step 1); entropy: the papers' prediction-entropy "
                               "minimisation; infomax: entropy minus the entropy of the batch-mean prediction")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="distill: softmax temperature T (loss scaled by T²)")
    holdout: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of each task's rows held out of adaptation for the "
                                                            "label-free guard (0: no guard)")
    holdout_max_rows: int = Field(512, ge=1, description="at most this many held-out rows per task")
    select: Literal["best", "final"] = Field(
        "best", description="best: publish the state the label-free guard scored highest (agreement with the task "
                            "models on held-out inputs, at step 0 and every checkpoint); final: the last step")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the entropy forward/backward and of the weights and gradients sent between shards and "
                            "workers; auto: bfloat16 when every merged tensor is exported as bfloat16 (the forward then runs the "
                            "exported model), else float32")
