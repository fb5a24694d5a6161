"""The method registry: each method binds a pydantic parameter model (its schema) to a per-tensor rule.

The streaming executor calls, for every merged tensor, `method.merge(inputs)` → (delta from the base, report info).
Methods that need whole-model statistics declare `stat_passes()`; each pass sees every merged tensor once before
merging starts, so nothing ever needs a whole model in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor

from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods import elementwise as ew
from rankmerge.workers.methods import interpolate as ip
from rankmerge.workers.methods import least_squares as lsq
from rankmerge.workers.methods import sparsify as spz
from rankmerge.workers.methods import spectral as sp
from rankmerge.workers.methods.streaming_stats import StreamingKthSmallest
from rankmerge.workers.methods.svd import SvdOptions
from rankmerge.workers.roles import Role


LowRank = sp.LowRank


@dataclass
class TensorInputs:
    """One merged tensor's inputs: key, role, fp32 base and stacked fp32 task vectors τ_t = θ_t − θ0 ([T, ...]).

    `merge` owns `taus` and may consume it in place; stat passes must not modify it.
    """

    key: str
    role: Role
    base: Tensor
    taus: Tensor
    factors: LowRank = ()  # per task, τ_t as (left, right) factors where it is a LoRA update, else None; () for none


@dataclass(frozen=True)
class MergeContext:
    task_names: tuple[str, ...]
    merged_numel: int  # entries over all merged (spectral + elementwise) tensors of one model


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StatPass:
    """One streaming pass over every merged tensor, run before merging."""

    description = "statistics"

    def observe(self, inputs: TensorInputs) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class MergeMethod:
    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    summary: ClassVar[str]
    task_copies: ClassVar[float] = 0.0  # extra [T, ...] fp32 temporaries per tensor (for the memory prediction)
    factorizes: ClassVar[bool] = False  # builds per-task SVD factors of spectral tensors
    svd_from_factors: ClassVar[bool] = False  # its factorization needs only each τ_t's SVD (LoRA factors suffice)
    needs_data: ClassVar[bool] = False  # reads each task's unlabeled inputs (`tta.data`) before merging
    entrywise: ClassVar[bool] = False  # each merged entry depends on that entry's inputs alone (no per-tensor statistic)

    def __init__(self, params: Params, ctx: MergeContext) -> None:
        self.params = params
        self.ctx = ctx

    def stat_passes(self) -> list[StatPass]:
        return []

    def caveats(self) -> list[str]:
        """Settings that run but likely do not do what the user meant (the job logs each as a warning)."""
        return []

    def merge(self, inputs: TensorInputs) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def factorized(self, role: Role, shape: tuple[int, ...]) -> bool:
        """Whether this tensor is merged from an SVD (memory forecast; AdaRank masks): spectral-role tensors, and with
        `spectral_keys: all_2d` every other merged 2-D tensor as well."""
        all_2d = getattr(self.params, "spectral_keys", "blocks") == "all_2d"
        return self.factorizes and (role is Role.SPECTRAL or (all_2d and role is Role.ELEMENTWISE and len(shape) == 2))

    def separable(self, role: Role, shape: tuple[int, ...]) -> bool:
        """Whether merging a block of this tensor's rows gives those rows of its merge (so the host merges it block
        by block: `static_merge.row_blocks`): entrywise methods, and factorizing ones off the tensors they factorize,
        which get an entrywise rule. The stat passes then see the blocks too, and the numbers of its report info
        must be per-entry means (a tensor's are its blocks', weighted by their sizes)."""
        return self.entrywise or (self.factorizes and not self.factorized(role, shape))

    def from_factors(self, role: Role, shape: tuple[int, ...]) -> bool:
        """Whether this tensor is merged from per-task SVDs alone: LoRA inputs then never form a dense task vector."""
        return self.svd_from_factors and not getattr(self, "centered", False) and self.factorized(role, shape)


METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, raw_params: dict[str, Any], ctx: MergeContext) -> MergeMethod:
    cls = method_class(name)
    return cls(parse_params(name, raw_params, len(ctx.task_names)), ctx)


def method_class(name: str) -> type[MergeMethod]:
    if name not in METHODS:
        raise MergeInputError(f"unknown method {name!r}", f"use one of: {', '.join(METHODS)}")
    return METHODS[name]


def parse_params(name: str, raw: dict[str, Any], num_tasks: int | None = None) -> Params:
    """Validate a static method's parameters; one line naming the bad parameter and the allowed range."""
    params = validate_params(name, method_class(name).Params, raw)
    lambdas = getattr(params, "tall_lambda", None)
    if num_tasks is not None and isinstance(lambdas, list) and len(lambdas) != num_tasks:
        raise MergeInputError(f"tall_lambda has {len(lambdas)} values for {num_tasks} tasks", "give one value or one per task")
    return params


def validate_params(name: str, model: type[Params], raw: dict[str, Any]) -> Params:
    """Any method's parameters through its pydantic model, errors as one line."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in input_path(raw, err["loc"])) or "params"
        if err["type"] == "extra_forbidden":
            known = ", ".join(f.alias or n for n, f in model.model_fields.items()) or "none"
            raise MergeInputError(f"unknown parameter {field!r} for method {name}", f"its parameters are: {known}") from None
        fix = f"fix the value (see `rankmerge schema --method {name}`)"
        if nonfinite_bound_error(err):
            raise MergeInputError(f"parameter {field!r} of {name} is {err['input']!r}: it must be a finite number", fix) from None
        raise MergeInputError(f"parameter {field!r} of {name}: {err['msg'].removeprefix('Value error, ')}", fix) from None


def input_path(raw: Any, loc: tuple) -> list:
    """An error's location as the user wrote it: without the union-member tags pydantic inserts (`lambda.float`)."""
    path, node = [], raw
    for part in loc:
        if (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int) and part < len(node)):
            path.append(part)
            node = node[part]
        elif not path:  # the first part is always the field (by alias), even when absent from the input
            path.append(part)
            node = None
    return path


BOUND_ERRORS = {"less_than", "less_than_equal", "greater_than", "greater_than_equal", "finite_number"}


def nonfinite_bound_error(err: dict[str, Any]) -> bool:
    """A range check failed on NaN/Inf: pydantic then names a bound ("≤ 10") instead of the real problem."""
    if err["type"] not in BOUND_ERRORS:
        return False
    try:
        return not math.isfinite(float(err.get("input")))
    except (TypeError, ValueError):
        return False


class TaskVectorMethod(MergeMethod):
    """A merge that is, off its factorized tensors, origin + w · Σ_t τ_t: what an adaptive merge can start from.

    AdaMerging starts from task arithmetic (nothing factorized), AdaRank from any `SpectralMethod`; the adaptive state
    (workers/tta/state.py) reads only this interface, so it never needs to know which method it holds.
    """

    centered: ClassVar[bool] = False  # task vectors taken about their mean (CART): the origin moves to θ0 + τ̄

    def origin_shift(self, taus: Tensor) -> Tensor | None:
        """What the origin moves by (the task vectors then move by minus it); None: the origin is the base itself."""
        return taus.mean(0) if self.centered else None

    def task_weight(self, num_tasks: int) -> float:
        """w of each task vector on tensors that are not factorized (the initial λ AdaMerging/AdaRank learn from)."""
        raise NotImplementedError


# ---- simple elementwise methods -----------------------------------------------------------------------------------
LAMBDA_BOUND = 10.0
Lambda = Field(0.3, alias="lambda", ge=-LAMBDA_BOUND, le=LAMBDA_BOUND, description="scale of the summed task vectors")


@register
class WeightAverage(MergeMethod):
    name = "weight_average"
    entrywise = True
    summary = "θ = mean of the fine-tuned models"

    class Params(Params):
        pass

    def merge(self, inputs):
        return ew.weight_average(inputs.taus), {}


PerTask = float | dict[str, float]  # one value for every task, or {task: value}


def per_task_values(name: str, value: PerTask, task_names: tuple[str, ...]) -> Tensor:
    """One value per task, in task order, from one number or a {task: value} mapping that names every task once."""
    return torch.tensor(per_task_floats(name, value, task_names))


def per_task_floats(name: str, value: PerTask, task_names: tuple[str, ...]) -> list[float]:
    """`per_task_values` as exact Python floats: counts such as ⌊density·n⌋ must not see float32 rounding."""
    if not isinstance(value, dict):
        return [float(value)] * len(task_names)
    missing, unknown = sorted(set(task_names) - set(value)), sorted(set(value) - set(task_names))
    if missing or unknown:
        raise MergeInputError(f"parameter {name!r} names tasks {sorted(value)} but the tasks are {list(task_names)}"
                              f" (missing {missing}, unknown {unknown})", f"give one {name} per task, or one number for all")
    return [float(value[t]) for t in task_names]


def check_per_task(value: PerTask, low: float, high: float) -> PerTask:
    """A per-task parameter's values are finite and in [low, high]; the message names the task."""
    for task, v in (value.items() if isinstance(value, dict) else [(None, value)]):
        which = f"the value for task {task!r}" if task is not None else "the value"
        if not math.isfinite(v):
            raise ValueError(f"{which} is {v}: it must be a finite number")
        if not low <= v <= high:
            raise ValueError(f"{which} is {v}: it must be in [{low:g}, {high:g}]")
    return value


@register
class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    entrywise = True
    summary = "θ = θ0 + Σ λ_t τ_t (one λ, or one per task)"

    class Params(Params):
        lambda_: PerTask = Field(0.3, alias="lambda", description="scale of the task vectors: one number "
                                 f"in [{-LAMBDA_BOUND:g}, {LAMBDA_BOUND:g}], or {{task: λ_t}}")

        @field_validator("lambda_")
        @classmethod
        def _bounded(cls, value: PerTask) -> PerTask:
            return check_per_task(value, -LAMBDA_BOUND, LAMBDA_BOUND)

    def __init__(self, params: Params, ctx: MergeContext) -> None:
        super().__init__(params, ctx)
        self.lambdas = per_task_values("lambda", params.lambda_, ctx.task_names)  # checked before any tensor is read

    def task_weight(self, num_tasks):
        return self.params.lambda_

    def merge(self, inputs):
        if not isinstance(self.params.lambda_, dict):
            return ew.task_arithmetic(inputs.taus, self.params.lambda_), {}
        return ew.weighted_sum(inputs.taus, self.lambdas.to(inputs.taus.device)), {}


@register
class Dare(MergeMethod):
    name = "dare"
    task_copies = 2.0
    summary = "random drop with probability p and 1/(1-p) rescale per task, then λ Σ τ_t"

    class Params(Params):
        p: float = Field(0.5, ge=0.0, lt=1.0, description="drop probability")
        lambda_: float = Lambda
        seed: int = Field(0, ge=0)
        rescale: bool = True

    def merge(self, inputs):
        p = self.params
        dropped = torch.stack(
            [ew.dare_drop(t, p.p, ew.stable_seed(p.seed, name, inputs.key), p.rescale) for name, t in zip(self.ctx.task_names, inputs.taus)]
        )
        return ew.task_arithmetic(dropped, p.lambda_), {}


@register
class Consensus(MergeMethod):
    name = "consensus"
    entrywise = True
    task_copies = 2.0
    summary = "TALL masks per task, keep entries used by >= k tasks, α Σ τ_t"

    class Params(Params):
        alpha: float = Field(0.3, ge=-10.0, le=10.0)
        tall_lambda: float | list[float] = Field(0.4, description="TALL mask λ_t: one value or one per task")
        k: int = Field(2, ge=1, description="minimum number of tasks whose TALL mask keeps an entry")

    def merge(self, inputs):
        p = self.params
        lambdas = torch.tensor(p.tall_lambda if isinstance(p.tall_lambda, list) else [p.tall_lambda] * len(inputs.taus),
                               device=inputs.taus.device)
        delta = ew.consensus(inputs.taus, lambdas, p.k, p.alpha)
        return delta, {}


# ---- TIES (global trim from two streaming passes, then a majority-sign pass) ---------------------------------------
class _KthHighPass(StatPass):
    description = "trim thresholds (1/2)"

    def __init__(self, kth: StreamingKthSmallest) -> None:
        self.kth = kth

    def observe(self, inputs):
        for t, tau in enumerate(inputs.taus):
            self.kth.observe_high(t, tau.abs())

    def finish(self):
        self.kth.finish_high()


class _KthLowPass(_KthHighPass):
    description = "trim thresholds (2/2)"

    def observe(self, inputs):
        for t, tau in enumerate(inputs.taus):
            self.kth.observe_low(t, tau.abs())

    def finish(self):
        pass


class _MajoritySignPass(StatPass):
    """Σ over all entries of the elected sign; its sign resolves entries whose task mass cancels exactly."""

    description = "sign election"

    def __init__(self, trim_fn) -> None:
        self.trim_fn = trim_fn
        self.total = 0.0
        self.majority = 0.0

    def observe(self, inputs):
        self.total += float(ew.elected_signs(self.trim_fn(inputs)).sum())

    def finish(self):
        self.majority = float(torch.sign(torch.tensor(self.total)))


@register
class Ties(MergeMethod):
    name = "ties"
    task_copies = 2.5
    summary = "TIES: top-k trim per task (over the whole model, or per tensor), sign election, disjoint sum/mean, × λ"

    class Params(Params):
        k: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector's entries kept")
        lambda_: float = Lambda
        merge: Literal["sum", "mean"] = "sum"
        scope: Literal["model", "tensor"] = Field(
            "model", description="model: one trim threshold per task over all its entries (the TIES paper; 3 extra "
            "streaming passes); tensor: per tensor, as mergekit does (one pass)")

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        rank = ew.trim_rank(ctx.merged_numel, params.k)
        self.kth = StreamingKthSmallest([rank] * len(ctx.task_names))
        self._thresholds: Tensor | None = None
        self.signs = _MajoritySignPass(self._trim)

    def _trim(self, inputs):
        return ew.trim_(inputs.taus.clone(), self.thresholds())

    def stat_passes(self):
        return [_KthHighPass(self.kth), _KthLowPass(self.kth), self.signs] if self.params.scope == "model" else []

    def caveats(self):
        if len(self.ctx.task_names) > 1:
            return []
        return ["ties with one model: sign election is a no-op (the result is its trimmed task vector × λ) — "
                "merge two or more models, or use task_arithmetic"]

    def separable(self, role, shape):
        """With one threshold per task over the whole model (from the stat passes), every entry is merged alone."""
        return self.params.scope == "model"

    def thresholds(self) -> Tensor:
        """Per-task trim thresholds; valid once both histogram passes have run."""
        if self._thresholds is None:
            self._thresholds = self.kth.thresholds()
        return self._thresholds

    def merge(self, inputs):
        if self.params.scope == "model":
            trimmed = ew.trim_(inputs.taus, self.thresholds())  # the inputs are ours to consume
            majority = self.signs.majority
        else:
            thresholds = torch.stack([ew.kth_smallest_threshold(t, self.params.k) for t in inputs.taus])
            trimmed = ew.trim_(inputs.taus, thresholds)
            majority = float(torch.sign(ew.elected_signs(trimmed).sum()))
        kept = int(torch.count_nonzero(trimmed)) / trimmed.numel()
        delta = ew.disjoint_merge_(trimmed, majority, self.params.merge).mul_(self.params.lambda_)
        return delta, {"kept_fraction": round(kept, 6)}


class _MergekitTaskArithmetic(MergeMethod):
    """mergekit's generalized task arithmetic: sparsify each task vector (its own density), optionally rescale it to
    its L1 norm (`rescale`), weight it, then mix: with `consensus`, only the tasks agreeing with the sign of the
    weighted sum (a zero sum elects +), divided by their summed weights under `normalize` (1 where none agree);
    without, the weighted sum divided by Σ w_t under `normalize` (a sum below 1e-8 divides by 1). × λ."""

    task_copies = 3.0
    consensus: ClassVar[bool] = True

    class Params(Params):
        weight: PerTask = Field(1.0, description="each task vector's weight: one number or {task: w_t}")
        density: PerTask = Field(1.0, description="fraction of each tensor's entries kept per task: one number or {task: d_t}")
        normalize: bool = Field(True, description="divide by the summed weights (of the agreeing tasks, with sign consensus)")
        lambda_: float = Field(1.0, alias="lambda", ge=-LAMBDA_BOUND, le=LAMBDA_BOUND, description="scale of the merged update")

        @field_validator("weight")
        @classmethod
        def _weights(cls, value: PerTask) -> PerTask:
            return check_per_task(value, -LAMBDA_BOUND, LAMBDA_BOUND)

        @field_validator("density")
        @classmethod
        def _densities(cls, value: PerTask) -> PerTask:
            return check_per_task(value, 0.0, 1.0)

    def __init__(self, params: Params, ctx: MergeContext) -> None:
        super().__init__(params, ctx)
        self.weights = per_task_values("weight", params.weight, ctx.task_names)
        self.densities = per_task_floats("density", params.density, ctx.task_names)

    def sparsify(self, tau: Tensor, task: int, key: str) -> Tensor:
        """Task `task`'s sparsified task vector on tensor `key` (before any rescale)."""
        raise NotImplementedError

    def _kept(self, tau: Tensor, task: int, key: str) -> Tensor:
        sparse = self.sparsify(tau, task, key)
        return spz.rescale_l1(tau, sparse) if getattr(self.params, "rescale", False) else sparse

    def merge(self, inputs):
        kept = torch.stack([self._kept(tau, t, inputs.key) for t, tau in enumerate(inputs.taus)])
        fraction = int(torch.count_nonzero(kept)) / kept.numel()
        if self.consensus:
            delta = ew.weighted_sign_consensus(kept, self.weights.to(kept.device), self.params.normalize)
        else:
            delta = spz.weighted_linear(kept, self.weights.to(kept.device), self.params.normalize)
        return delta.mul_(self.params.lambda_), {"kept_fraction": round(fraction, 6)}


@register
class TiesMergekit(_MergekitTaskArithmetic):
    name = "ties_mergekit"
    summary = ("TIES as mergekit computes it: per-task weight and density, exactly ⌊density·n⌋ entries kept per tensor, "
               "signs of the weighted sum (0 counts as +), weighted mean over the agreeing tasks")

    def sparsify(self, tau, task, key):
        return ew.keep_top_count(tau, self.densities[task])


class _BreadcrumbsParams(_MergekitTaskArithmetic.Params):
    gamma: PerTask = Field(0.01, description="fraction of each tensor's largest-magnitude entries dropped per task "
                           "(one number or {task: γ_t}); ⌊γ·n⌋ = 0 drops the tensor's task vector whole, as in mergekit")
    normalize: bool = Field(False, description="divide by the summed weights (of the agreeing tasks, with sign consensus)")
    rescale: bool = Field(False, description="rescale each sparsified task vector to its original L1 norm")

    @field_validator("gamma")
    @classmethod
    def _gammas(cls, value: PerTask) -> PerTask:
        return check_per_task(value, 0.0, 1.0)


@register
class BreadcrumbsMergekit(_MergekitTaskArithmetic):
    """Model Breadcrumbs as mergekit's `breadcrumbs`: outliers and small entries dropped, weighted sum (no consensus)."""

    name = "breadcrumbs"
    consensus = False
    summary = ("Model Breadcrumbs (mergekit): per task drop the ⌊γn⌋ largest entries and the smallest, keeping "
               "⌊density·n⌋; weighted sum × λ")
    Params = _BreadcrumbsParams

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.gammas = per_task_floats("gamma", params.gamma, ctx.task_names)

    def caveats(self):
        if min(self.gammas) > 0:
            return []
        return [f"{self.name} with gamma 0 drops every sparsified task vector (mergekit keeps an empty slice when "
                "⌊γ·n⌋ = 0) — give gamma > 0, or use ties_mergekit for a plain magnitude trim"]

    def sparsify(self, tau, task, key):
        return spz.magnitude_outliers(tau, self.densities[task], self.gammas[task])


@register
class BreadcrumbsTies(BreadcrumbsMergekit):
    name = "breadcrumbs_ties"
    consensus = True
    summary = "Model Breadcrumbs sparsification with TIES sign consensus (mergekit `breadcrumbs_ties`) × λ"


class _DellaParams(_MergekitTaskArithmetic.Params):
    epsilon: PerTask = Field(0.15, description="keep probabilities span density ± ε by magnitude rank (one number or "
                             "{task: ε_t}); density ± ε must lie in (0, 1)")
    rescale: bool = Field(True, description="rescale each sparsified task vector to its original L1 norm")
    seed: int = Field(0, ge=0, description="seed of the random drop masks (one stream per task and tensor)")

    @field_validator("epsilon")
    @classmethod
    def _epsilons(cls, value: PerTask) -> PerTask:
        return check_per_task(value, 0.0, 0.5)


@register
class Della(_MergekitTaskArithmetic):
    """DELLA as mergekit's `della`: MagPrune random drop (seeded here), L1 rescale, TIES sign consensus."""

    name = "della"
    summary = ("DELLA (mergekit): random drop with keep probability density ± ε by magnitude rank per row, L1 "
               "rescale, sign consensus, weighted mean × λ (seeded)")
    Params = _DellaParams

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.epsilons = per_task_floats("epsilon", params.epsilon, ctx.task_names)
        for name, d, e in zip(ctx.task_names, self.densities, self.epsilons):
            if 0 < d < 1 and not (0 < d - e and d + e < 1):
                raise MergeInputError(f"{self.name}: task {name!r} has density {d:g} ± epsilon {e:g} outside (0, 1)",
                                      "lower epsilon, or move density away from 0 and 1")

    def sparsify(self, tau, task, key):
        seed = ew.stable_seed(self.params.seed, self.ctx.task_names[task], key)
        return spz.della_magprune(tau, self.densities[task], self.epsilons[task], seed)


class _DellaLinearParams(_DellaParams):
    normalize: bool = Field(False, description="divide the weighted sum by Σ w_t")


@register
class DellaLinear(Della):
    name = "della_linear"
    consensus = False
    summary = "DELLA's MagPrune drop and L1 rescale, then a weighted sum × λ (mergekit `della_linear`, seeded)"
    Params = _DellaLinearParams


@register
class Sce(MergeMethod):
    name = "sce"
    task_copies = 3.0
    summary = ("SCE (mergekit): keep the highest-variance entries across tasks, weight tasks by mean τ², erase "
               "sign conflicts, weighted mean")

    class Params(Params):
        select_topk: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the nonzero-variance entries kept")

    def merge(self, inputs):
        return spz.sce(inputs.taus, self.params.select_topk), {}


@register
class MagMax(MergeMethod):
    name = "magmax"
    entrywise = True
    summary = "MagMax (FusionBench): per entry the task value of largest magnitude (later task on ties), × scaling_factor"

    class Params(Params):
        scaling_factor: float = Field(0.5, ge=-LAMBDA_BOUND, le=LAMBDA_BOUND, description="scale of the selected task vector")

    def merge(self, inputs):
        return spz.magmax(inputs.taus).mul_(self.params.scaling_factor), {}


@register
class Wudi(MergeMethod):
    name = "wudi"
    task_copies = 3.0
    summary = ("WUDI (FusionBench): per 2-D tensor, Adam from Σ τ_t on Σ_t ‖(τ − τ_t) τ_tᵀ‖²/‖τ_t‖² (data-free); "
               "the mean task vector elsewhere")

    class Params(Params):
        iter_num: int = Field(400, ge=0, le=100_000, description="Adam steps per 2-D tensor (FusionBench: 400)")
        lr: float = Field(1e-5, gt=0.0, le=1.0, description="Adam learning rate (FusionBench: 1e-5)")

    def merge(self, inputs):
        if inputs.taus.dim() != 3:
            return ew.weight_average(inputs.taus), {}
        return lsq.wudi(inputs.taus, self.params.iter_num, self.params.lr), {}


GramLookup = Callable[[str], "tuple[Tensor, bool] | None"]  # key -> ([T, n, n] input Gram matrices, stored [out, in])


@register
class RegMean(MergeMethod):
    name = "regmean"
    needs_data = True
    task_copies = 2.0
    summary = ("RegMean (FusionBench): per linear layer W = (Σ G̃_t)⁻¹ Σ G̃_t W_t from each task model's input Gram "
               "matrices on its `tta.data` (off-diagonals × ratio); other tensors averaged")

    class Params(Params):
        num_regmean_examples: int = Field(256, ge=1, description="rows of each task's data the Gram matrices are computed on")
        reduce_non_diagonal_ratio: float = Field(0.95, ge=0.0, le=1.0, description="off-diagonal Gram entries × this "
                                                 "(FusionBench's CLIP setting; 1 is plain RegMean)")

    grams: GramLookup | None = None  # set by the job once the Gram pass has run (workers/tta/grams.py)

    def merge(self, inputs):
        if self.grams is None:
            raise MergeInputError("regmean needs each task's input Gram matrices",
                                  "run it from a job spec with `tta: {data: {task: file}}` (`rankmerge run job.yaml`)")
        found = self.grams(inputs.key) if inputs.taus.dim() == 3 else None
        if found is None:
            return ew.weight_average(inputs.taus), {}
        grams, transposed = found
        delta = lsq.regmean(inputs.taus, grams.to(inputs.taus.device), self.params.reduce_non_diagonal_ratio, transposed)
        return delta, {"regmean": True}


# ---- interpolation of whole weights (mergekit's slerp, nuslerp, karcher, model_stock) -------------------------------
def require_tasks(method: str, ctx: MergeContext, low: int, high: int | None = None) -> None:
    """A method defined for a fixed number of fine-tuned models refuses others before any tensor is read."""
    count = len(ctx.task_names)
    if count >= low and (high is None or count <= high):
        return
    wanted = f"exactly {low}" if high == low else f"at least {low}"
    raise MergeInputError(f"{method} merges {wanted} fine-tuned model{'s' if low > 1 else ''} with the base; got {count}",
                          f"give {wanted} --model")


@register
class Slerp(MergeMethod):
    name = "slerp"
    task_copies = 1.0
    summary = "SLERP (mergekit): spherical interpolation from the base (t=0) to the one fine-tuned model (t=1), per tensor"

    class Params(Params):
        t: float = Field(0.5, ge=0.0, le=1.0, description="interpolation position: 0 the base, 1 the fine-tuned model")

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        require_tasks(self.name, ctx, 1, 1)

    def merge(self, inputs):
        return ip.slerp(self.params.t, inputs.base, inputs.base + inputs.taus[0]).sub_(inputs.base), {}


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    task_copies = 2.0
    summary = ("NuSLERP (mergekit): slerp between two fine-tuned models' task vectors (or weights), t = w_2/(w_1+w_2); "
               "whole tensor, per row or per column")

    class Params(Params):
        weight: PerTask = Field(1.0, description="relative weight of each of the two models: one number or {task: w_t}")
        nuslerp_flatten: bool = Field(True, description="one angle for the whole tensor (else one per row or column)")
        nuslerp_row_wise: bool = Field(False, description="without flatten: per column (vectors along dim 0), not per row")
        use_base: bool = Field(True, description="interpolate task vectors about the base (mergekit with base_model); "
                               "false: the two models' weights (mergekit without base_model)")

        @field_validator("weight")
        @classmethod
        def _weights(cls, value: PerTask) -> PerTask:
            return check_per_task(value, -LAMBDA_BOUND, LAMBDA_BOUND)

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        require_tasks(self.name, ctx, 2, 2)
        w = per_task_floats("weight", params.weight, ctx.task_names)
        self.t = w[1] / (w[0] + w[1]) if abs(w[0] + w[1]) >= 1e-6 else 0.5  # mergekit: 0.5 for a near-zero sum

    def merge(self, inputs):
        p = self.params
        if p.use_base:
            return ip.nuslerp(self.t, inputs.taus[0], inputs.taus[1], p.nuslerp_row_wise, p.nuslerp_flatten), {}
        models = inputs.taus.add_(inputs.base)
        return ip.nuslerp(self.t, models[0], models[1], p.nuslerp_row_wise, p.nuslerp_flatten).sub_(inputs.base), {}


@register
class Karcher(MergeMethod):
    name = "karcher"
    task_copies = 1.0  # include_base's stack; the directions are normalised in place
    summary = "Karcher mean (mergekit): Riemannian mean of the models' directions on the sphere × their mean norm"

    class Params(Params):
        max_iter: int = Field(10, ge=1, le=1000, description="most Riemannian gradient steps per tensor")
        tol: float = Field(1e-5, gt=0.0, le=1.0, description="stop when the step is shorter than this; also skips tiny norms and angles")
        include_base: bool = Field(False, description="average the base with the fine-tuned models (mergekit lists base_model among them)")

    def merge(self, inputs):
        models = inputs.taus.add_(inputs.base)
        if self.params.include_base:
            models = torch.cat([inputs.base[None], models])
        return ip.karcher_mean(models, self.params.max_iter, self.params.tol).sub_(inputs.base), {}


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    task_copies = 1.0
    summary = "Model Stock (mergekit): θ0 + t·mean τ_t, t from the mean pairwise cosine of the task vectors"

    class Params(Params):
        filter_wise: bool = Field(False, description="one ratio per row (along the last dim) instead of per tensor")

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        require_tasks(self.name, ctx, 2)

    def merge(self, inputs):
        return ip.model_stock(inputs.taus, self.params.filter_wise), {}


# ---- distribution-aware per-tensor drop (our design in the spirit of TADrop) ---------------------------------------
class _ConcentrationPass(StatPass):
    description = "tensor concentration"

    def __init__(self, method: "DistributionAwareDrop") -> None:
        self.method = method
        self.values: dict[str, float] = {}

    def observe(self, inputs):
        self.values[inputs.key] = ew.concentration(inputs.taus, self.method.params.top_fraction)

    def finish(self):
        p = self.method.params
        keys = list(self.values)
        rates = ew.drop_rates(torch.tensor([self.values[k] for k in keys]), p.p, p.beta, p.p_min, p.p_max)
        self.method.rates = dict(zip(keys, rates.tolist()))


@register
class DistributionAwareDrop(MergeMethod):
    """Not a reproduction of TADrop (its statistic is unpublished here): our per-tensor rate from the concentration
    of the task-vector mass — dense tensors are redundant and dropped harder, heavy-tailed ones are kept more."""

    name = "tadrop"
    task_copies = 2.5
    summary = "distribution-aware per-tensor drop rates (our design, in the spirit of TADrop) on a TA/TIES/DARE host"

    class Params(Params):
        p: float = Field(0.5, ge=0.0, lt=1.0, description="mean target drop rate p̄")
        beta: float = Field(0.1, ge=0.0, le=1.0, description="rate change per standard deviation of concentration")
        p_min: float = Field(0.1, ge=0.0, lt=1.0)
        p_max: float = Field(0.9, ge=0.0, lt=1.0)
        top_fraction: float = Field(0.01, gt=0.0, le=1.0, description="top share of entries whose mass measures concentration")
        host: Literal["ta", "ties", "dare"] = "ta"
        lambda_: float = Lambda
        seed: int = Field(0, ge=0)

        @field_validator("p_max")
        @classmethod
        def _ordered(cls, v, info):
            if v < info.data.get("p_min", 0.0):
                raise ValueError("p_max must be >= p_min")
            return v

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.rates: dict[str, float] = {}
        self.signs = _MajoritySignPass(self._drop)

    def stat_passes(self):
        passes: list[StatPass] = [_ConcentrationPass(self)]
        return passes + [self.signs] if self.params.host == "ties" else passes

    def _drop(self, inputs):
        rate = self.rates[inputs.key]
        if self.params.host == "dare":
            return torch.stack(
                [ew.dare_drop(t, rate, ew.stable_seed(self.params.seed, n, inputs.key)) for n, t in zip(self.ctx.task_names, inputs.taus)]
            )
        return ew.magnitude_drop(inputs.taus, rate)

    def merge(self, inputs):
        dropped = self._drop(inputs)
        if self.params.host == "ties":
            delta = ew.disjoint_merge_(dropped, self.signs.majority, "sum").mul_(self.params.lambda_)
        else:
            delta = ew.task_arithmetic(dropped, self.params.lambda_)
        return delta, {"drop_rate": round(self.rates[inputs.key], 6)}


# ---- spectral methods ---------------------------------------------------------------------------------------------
class SvdParams(Params):
    """How the leading singular components are computed (shared by every factorizing method and AdaRank)."""

    svd: Literal["exact", "randomized"] = Field("exact", description="randomized: seeded sketch + power iterations, only the components kept")
    oversample: int = Field(10, ge=0, le=4096, description="randomized: sketch columns beyond the components kept")
    power_iters: int = Field(2, ge=0, le=20, description="randomized: power iterations (sharper on flat spectra)")

    def svd_options(self) -> SvdOptions:
        return SvdOptions(self.svd, self.oversample, self.power_iters)


SVD_FIELDS = tuple(SvdParams.model_fields)
SpectralKeys = Literal["blocks", "all_2d"]


class SpectralKeysParams(Params):
    """Which tensors a spectral method factorizes (every other merged tensor gets its elementwise rule)."""

    spectral_keys: SpectralKeys = Field("blocks", description="blocks: 2-D weights inside repeated blocks; all_2d: every "
                                        "merged 2-D tensor (embeddings, position embeddings, lm_head too), as FusionBench does")


MaxRank = Field(None, ge=1, description="at most this many components per task vector (memory and time cap)")


@register
class Star(MergeMethod):
    name = "star"
    factorizes = True
    summary = "STAR: per-task spectral truncation to η% of the nuclear norm, rescaled; averaged"

    class Params(SpectralKeysParams):
        eta: float = Field(40.0, gt=0.0, le=100.0, description="percent of singular-value mass kept")

    def merge(self, inputs):
        if not self.factorized(inputs.role, tuple(inputs.taus.shape[1:])):
            return ew.weight_average(inputs.taus), {}
        truncated = [sp.star_truncate(t, self.params.eta) for t in inputs.taus]
        delta = torch.stack([d for d, _ in truncated]).mean(0)
        return delta, {"ranks": [k for _, k in truncated]}


class SpectralMethod(TaskVectorMethod):
    """A merge that, on spectral tensors, materialises a factorization of the task vectors with its initial mask.

    Static merge = origin shift + scale · Σ_components (initial mask ⊙ s) u vᵀ over `factorize(τ − shift)`; AdaRank
    learns the mask and one λ per owner over the same components (any spectral method, no code of its own). A subclass
    says how it factorizes, what scale it applies, and its rule on the other tensors.
    """

    factorizes = True
    label: ClassVar[str]  # short name in tables ("CART+AdaRank")
    adaptive_defaults: ClassVar[dict[str, Any]] = {}  # where AdaRank starts when the spec leaves a parameter unset

    def factorize(self, taus: Tensor, cap: int | None, low_rank: LowRank = ()) -> sp.SpectralFactorization:
        """Components of one tensor's (shifted) task vectors, owners and the static initial mask; at most `cap` per
        owner (None: all the method has). `low_rank`: the unshifted τ_t's LoRA factors (per-task SVDs use them)."""
        raise NotImplementedError

    def static_cap(self, rank: int) -> int | None:
        """Components per owner the static merge needs (None: all): computing fewer is the saving of TA-SVD/CART."""
        return None

    def scale(self) -> float:
        """The scale of the spectral components (λ or α): AdaRank's initial λ on factorized tensors."""
        raise NotImplementedError

    def elementwise(self, taus: Tensor) -> Tensor:
        """The static delta of a tensor that is not factorized."""
        raise NotImplementedError

    def merge_info(self, fac: sp.SpectralFactorization) -> dict[str, Any]:
        return {"components": int(fac.initial_mask.sum())}

    def merge(self, inputs):
        if not self.factorized(inputs.role, tuple(inputs.taus.shape[1:])):
            return self.elementwise(inputs.taus), {}
        shift = self.origin_shift(inputs.taus)
        taus = inputs.taus if shift is None else inputs.taus.sub_(shift)  # the inputs are ours to consume
        fac = self.factorize(taus, self.static_cap(min(taus.shape[1:])), inputs.factors if shift is None else ())
        delta = fac.materialize(scale=self.scale())
        return (delta if shift is None else shift.add_(delta)), self.merge_info(fac)


def spectral_methods() -> dict[str, type[SpectralMethod]]:
    """Every registered method AdaRank can adapt."""
    return {name: cls for name, cls in METHODS.items() if issubclass(cls, SpectralMethod)}


class _PerTaskSpectral(SpectralMethod):
    """Per-task truncated SVDs (of τ_t, or of τ_t − τ̄ when centered), each task's top max(1, ⌊ρ r⌋) kept, × λ."""

    def keep(self, rank: int) -> int:
        return capped(sp.cart_keep(rank, self.params.rho), self.params.max_rank)

    def factorize(self, taus, cap, low_rank=()):
        return sp.per_task_factorization(taus, keep=self.keep(min(taus.shape[1:])), cap=cap, svd=self.params.svd_options(),
                                         low_rank=low_rank)

    def static_cap(self, rank):
        return self.keep(rank)

    def scale(self):
        return self.params.lambda_

    def task_weight(self, num_tasks):
        return self.params.lambda_

    def merge_info(self, fac):
        return {"rank_per_task": int(fac.initial_mask.sum()) // len(self.ctx.task_names)}


@register
class TaSvd(_PerTaskSpectral):
    name = "ta_svd"
    svd_from_factors = True
    label = "TA"  # AdaRank starts it at ρ = 1: task arithmetic, the AdaRank paper's TA+AdaRank
    summary = "TA-SVD: θ0 + λ Σ_t rank-max(1, ⌊ρ r⌋) SVD of τ_t (spectral tensors; full τ_t elsewhere)"
    adaptive_defaults = {"rho": 1.0}  # AdaRank-TA starts from task arithmetic: every component on

    class Params(SvdParams, SpectralKeysParams):
        lambda_: float = Lambda
        rho: float = Field(0.1, ge=0.0, le=1.0, description="fraction of each task vector's rank kept")
        max_rank: int | None = MaxRank

    def elementwise(self, taus):
        return ew.task_arithmetic(taus, self.params.lambda_)


@register
class Cart(_PerTaskSpectral):
    name = "cart"
    label = "CART"
    task_copies = 1.0
    centered = True
    summary = "CART: θ̄ + λ Σ low-rank(θ_t − θ̄), rank max(1, ⌊ρ r⌋)"
    adaptive_defaults = {"lambda": 2.3, "rho": 0.16}  # the AdaRank paper's CART start

    class Params(SvdParams, SpectralKeysParams):
        lambda_: float = Field(2.0, alias="lambda", ge=-10.0, le=10.0)
        rho: float = Field(0.12, ge=0.0, le=1.0, description="fraction of each centered task vector's rank kept")
        max_rank: int | None = MaxRank

    def elementwise(self, taus):
        return taus.mean(0)


def capped(keep: int, max_rank: int | None) -> int:
    return keep if max_rank is None else min(keep, max_rank)


class _SpectralOnMean(SpectralMethod):
    """θ0 + α Δ: Δ from a factorization on spectral tensors, the mean task vector elsewhere."""

    def scale(self):
        return self.params.alpha

    def task_weight(self, num_tasks):
        return self.params.alpha / num_tasks

    def elementwise(self, taus):
        return ew.weight_average(taus).mul_(self.params.alpha)


class _AlphaParams(SpectralKeysParams):
    alpha: float = Field(1.0, ge=-10.0, le=10.0, description="scale of the merged delta")


class _AlphaSvdParams(_AlphaParams, SvdParams):
    pass


@register
class TsvM(_SpectralOnMean):
    name = "tsv_m"
    svd_from_factors = True
    label = "TSV-M"
    summary = "TSV-M: top ⌊r/T⌋ singular vectors per task, whitened (polar), × α"

    class Params(_AlphaSvdParams):
        max_rank: int | None = MaxRank

    def factorize(self, taus, cap, low_rank=()):
        """Whitened over all its components first, then truncated: the kept directions are exactly the static ones."""
        return sp.tsv_factorization(taus, self.params.svd_options(), self.params.max_rank, low_rank).truncated(cap)


@register
class IsoC(_SpectralOnMean):
    name = "iso_c"
    label = "Iso-C"
    summary = "Iso-C: spectrum of Σ τ_t flattened to its mean, × α"
    Params = _AlphaParams

    def factorize(self, taus, cap, low_rank=()):
        """Dense: σ̄ also lands on the null space of a low-rank Σ τ_t, so factors would not give the same merge."""
        return sp.iso_c_factorization(taus).truncated(cap)


@register
class IsoCts(_SpectralOnMean):
    name = "iso_cts"
    label = "Iso-CTS"
    summary = "Iso-CTS: common + task-specific subspaces, orthogonalised, isotropic spectrum, × α"

    class Params(_AlphaSvdParams):
        common_fraction: float = Field(0.8, ge=0.0, le=1.0, description="share of the rank given to the common subspace")

    def factorize(self, taus, cap, low_rank=()):
        return sp.iso_cts_factorization(taus, self.params.common_fraction, self.params.svd_options()).truncated(cap)
