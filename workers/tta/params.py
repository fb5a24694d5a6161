"""Parameters of the adaptive methods and of the test-time-adaptation loop (pydantic: schema and range checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from workers.methods.registry import Params, SvdParams

DEFAULT_LAMBDA = {"ta": 0.3, "cart": 2.3, "tsv_m": 1.0, "iso_cts": 1.0}


class AdaRankParams(SvdParams):
    """AdaRank: learnable binary masks over the singular components of a factorization, plus λ per task × tensor."""

    factorization: Literal["ta", "cart", "tsv_m", "iso_cts"] = "ta"
    lambda_: float | None = Field(None, alias="lambda", ge=-10.0, le=10.0, description="λ0 (α for tsv_m/iso_cts); default per factorization: ta 0.3, cart 2.3, tsv_m/iso_cts 1.0")
    rho: float = Field(0.16, ge=0.0, le=1.0, description="cart: fraction of components on at init")
    common_fraction: float = Field(0.8, ge=0.0, le=1.0, description="iso_cts: share of the rank in the common subspace")
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

    def initial_lambda(self) -> float:
        return self.lambda_ if self.lambda_ is not None else DEFAULT_LAMBDA[self.factorization]


class AdaMergingParams(Params):
    """AdaMerging (layer-wise): λ per task × tensor over plain task vectors."""

    lambda_: float = Field(0.3, alias="lambda", ge=-10.0, le=10.0, description="initial λ")
    clamp: bool = Field(False, description="clamp λ to [0, 1] in the forward, as the original AdaMerging code")


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
