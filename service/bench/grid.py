"""The benchmark's method list, grouped like the AdaRank paper's Table 1, with each static method's validation grid
and each suite's fixed test-time-adaptation settings.

Why grids and not the registry defaults: the papers choose static hyper-parameters on a validation split (docs/METHODS.md
"honest evaluation"); the grids are small so a CPU run stays in minutes. Adaptive methods get no grid at all: they start
from the paper's defaults (each spectral method's `adaptive_defaults`, workers/methods/registry.py) and report the
final step, with lr/steps/batch fixed per suite below — written once, never tuned on test accuracy. Every spectral
method in the registry gets an AdaRank row.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods.registry import spectral_methods
from rankmerge.workers.tta.params import ADAPTIVE_METHODS, LEGACY_FACTORIZATIONS, AdaMergingParams

Kind = Literal["reference", "static", "adaptive"]

REFERENCE = "Reference"
DATA_FREE = "Data-free"
SPECTRAL = "Data-free, spectral"
ADAPTIVE = "Test-time adaptation"
GROUPS = (REFERENCE, DATA_FREE, SPECTRAL, ADAPTIVE)


@dataclass(frozen=True)
class BenchMethod:
    """One row of the table: a job method with fixed parameters, plus a grid searched on val (static only)."""

    name: str  # record name, unique
    label: str  # as in the paper's tables
    group: str
    kind: Kind
    method: str = ""  # registry / adaptive method name; empty for the reference rows
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()  # random methods: the chosen parameters are re-run with these seeds and averaged
    tta: dict[str, Any] = field(default_factory=dict)  # adaptive: the job's tta settings besides steps/lr/batch

    @property
    def initial(self) -> tuple[str, dict[str, Any]] | None:
        """Adaptive: the static job equal to the adapted model at step 0 (where the adaptation started)."""
        return ADAPTIVE_METHODS[self.method].model_validate(self.fixed).static_twin() if self.kind == "adaptive" else None

    def candidates(self) -> list[dict[str, Any]]:
        """Every parameter set to try: the fixed ones with each point of the grid's cartesian product."""
        names = list(self.grid)
        return [{**self.fixed, **dict(zip(names, values))} for values in itertools.product(*(self.grid[n] for n in names))]


def _steps(start: float, stop: float, step: float) -> tuple[float, ...]:
    count = int(round((stop - start) / step)) + 1
    return tuple(round(start + i * step, 6) for i in range(count))


LAMBDAS = _steps(0.1, 1.0, 0.1)  # TA λ
COARSE_LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # λ next to a second hyper-parameter (dense where T is large)
ROW_NAMES = {method: row for row, (method, *_) in LEGACY_FACTORIZATIONS.items()}  # adarank_<row>: the rows' names before `base`
ALPHAS = _steps(0.5, 3.0, 0.5)  # TSV-M / Iso α (the papers search linspace(0, 3))
DROP_RATES = (0.3, 0.5, 0.7)


# The papers' objective, as they run it: entropy minimisation, final step. Our default rows distil from the task
# models and publish the label-free guard's best state (workers/tta/guard.py); both are label-free.
PAPER = {"objective": "entropy", "select": "final"}
ENTROPY_ROWS = ("ta_svd", "cart")  # spectral bases also run with the papers' objective


def _adarank(base: str, tta: dict[str, Any] | None = None) -> BenchMethod:
    """AdaRank over one registered spectral method, from AdaRank's start for it (its step 0 is that static merge)."""
    row = ROW_NAMES.get(base, base)
    label = f"{spectral_methods()[base].label}+AdaRank ({'entropy' if tta else 'distill'})"
    return BenchMethod(f"adarank_{row}{'_entropy' if tta else ''}", label, ADAPTIVE, "adaptive", "adarank", {"base": base},
                       tta=tta or {})


def _adamerging(label: str, tta: dict[str, Any] | None = None) -> BenchMethod:
    return BenchMethod("adamerging_entropy" if tta else "adamerging", label, ADAPTIVE, "adaptive", "adamerging",
                       {"lambda": AdaMergingParams().lambda_}, tta=tta or {})


METHODS: tuple[BenchMethod, ...] = (
    BenchMethod("pretrained", "Pretrained", REFERENCE, "reference"),
    BenchMethod("individual", "Individual", REFERENCE, "reference"),
    BenchMethod("weight_average", "Weight averaging", DATA_FREE, "static", "weight_average"),
    BenchMethod("task_arithmetic", "Task Arithmetic", DATA_FREE, "static", "task_arithmetic", grid={"lambda": LAMBDAS}),
    BenchMethod("ties", "TIES-Merging", DATA_FREE, "static", "ties", grid={"k": (0.1, 0.2, 0.4), "lambda": COARSE_LAMBDAS}),
    BenchMethod("dare", "DARE (TA)", DATA_FREE, "static", "dare", {"seed": 0}, {"p": DROP_RATES, "lambda": COARSE_LAMBDAS},
                seeds=(1, 2)),  # docs/METHODS.md §2: the drop seed matters, report the mean over seeds
    BenchMethod("consensus", "Consensus TA", DATA_FREE, "static", "consensus", {"k": 2},
                {"tall_lambda": (0.2, 0.4, 0.6), "alpha": COARSE_LAMBDAS}),
    BenchMethod("tadrop_ta", "TA + dist.-aware drop", DATA_FREE, "static", "tadrop", {"host": "ta"},
                {"p": DROP_RATES, "lambda": COARSE_LAMBDAS}),
    BenchMethod("tadrop_ties", "TIES + dist.-aware drop", DATA_FREE, "static", "tadrop", {"host": "ties"},
                {"p": DROP_RATES, "lambda": COARSE_LAMBDAS}),
    BenchMethod("star", "STAR", DATA_FREE, "static", "star", grid={"eta": (20.0, 40.0, 60.0, 80.0, 90.0)}),
    BenchMethod("cart", "CART", SPECTRAL, "static", "cart", grid={"rho": (0.08, 0.12, 0.16, 0.32), "lambda": _steps(0.5, 3.0, 0.5)}),
    BenchMethod("tsv_m", "TSV-M", SPECTRAL, "static", "tsv_m", grid={"alpha": ALPHAS}),
    BenchMethod("iso_c", "Iso-C", SPECTRAL, "static", "iso_c", grid={"alpha": ALPHAS}),
    BenchMethod("iso_cts", "Iso-CTS", SPECTRAL, "static", "iso_cts", grid={"common_fraction": (0.6, 0.8), "alpha": ALPHAS}),
    _adamerging("TA+AdaMerging (entropy)", PAPER),
    *(_adarank(base, PAPER) for base in ENTROPY_ROWS),
    _adamerging("TA+AdaMerging (distill)"),
    *(_adarank(base) for base in spectral_methods()),
)
BY_NAME = {m.name: m for m in METHODS}

# Smaller val grids where the full one (154 merges) does not fit a CPU budget, fixed from cost alone before any result:
# on `text` one candidate (merge MiniLM-L6 + score ~1900 val texts) takes ~20 s on one shared core, so the full grid
# alone would take ~1 h. Each grid keeps the range of the full one at fewer points; selection is still on val only.
SUITE_GRIDS: dict[str, dict[str, dict[str, tuple[Any, ...]]]] = {
    "text": {
        "task_arithmetic": {"lambda": COARSE_LAMBDAS},
        "ties": {"k": (0.2,), "lambda": (0.3, 0.5, 0.7, 1.0)},
        "dare": {"p": (0.5,), "lambda": (0.1, 0.2, 0.3, 0.5)},
        "consensus": {"tall_lambda": (0.4,), "alpha": (0.2, 0.3, 0.5, 0.7)},
        "tadrop_ta": {"p": (0.5,), "lambda": (0.2, 0.3, 0.5, 0.7)},
        "tadrop_ties": {"p": (0.5,), "lambda": (0.3, 0.5, 0.7, 1.0)},
        "star": {"eta": (20.0, 60.0, 90.0)},
        "cart": {"rho": (0.16, 0.32), "lambda": (1.0, 2.0, 3.0)},
        "tsv_m": {"alpha": (0.5, 1.0, 2.0, 3.0)},
        "iso_c": {"alpha": (0.5, 1.0, 2.0, 3.0)},
        "iso_cts": {"common_fraction": (0.8,), "alpha": (0.5, 1.0, 2.0, 3.0)},
    },
}


@dataclass(frozen=True)
class TTASettings:
    """The adaptation loop of every adaptive method on one suite (fixed in advance, not selected)."""

    steps: int
    lr: float
    batch_size: int


# digits-smoke: the settings of the digits AdaRank test; digits: the paper's lr (1e-3) with steps for a CPU budget.
#
# The others are fixed from cost alone, before any test number of the suite was seen (docs/METHODS.md §1). The paper runs
# 10 000 steps at lr 1e-3 (lr·steps = 10). Adam moves each mask logit by ~lr per step and a logit starts 0.1 from the
# threshold, so an entry flips after ~0.1/lr steps of consistently signed gradient: a CPU budget allows fewer steps at a
# proportionally larger lr, with lr·steps ~1 where the budget allows (every entry can flip, and λ, which also moves ~lr
# per step, moves by at most ~1, the scale of the paper's λ0 range).
# Measured on 2 CPU cores shared with other work, one torch thread, one protocol of one adaptive method:
#   text (MiniLM-L6, 5 tasks, batch 16/task): ~4.5 s per step + ~12 s setup, and the static part of the suite alone
#     takes ~25 min: 16 steps at lr 1e-2 (lr·steps 0.16; entries with a steady gradient sign flip after ~10 steps).
#     A real adaptation of this backbone is out of a CPU budget (10 000 steps would take ~12 h per run).
#   vision8 (4-layer ViT, hidden 96, 8 tasks, batch 16/task): 50 steps took 6.8 s with setup -> 500 steps at lr 2e-3
#     (lr·steps 1.0), ~1 min per protocol, ~20 min for the suite.
#   vision14 / vision20: same backbone, the step cost grows ~linearly with the task count -> 300 steps at 3e-3 /
#     250 steps at 4e-3 (lr·steps 0.9 / 1.0).
#   smoke suites: CI runs them; a few dozen steps at lr 1e-2 exercise the loop, flips included.
TTA: dict[str, TTASettings] = {
    "digits-smoke": TTASettings(steps=100, lr=1e-2, batch_size=32),
    "digits": TTASettings(steps=1000, lr=1e-3, batch_size=32),
    "text-smoke": TTASettings(steps=20, lr=1e-2, batch_size=8),
    "text": TTASettings(steps=16, lr=1e-2, batch_size=16),
    "vision-smoke": TTASettings(steps=50, lr=1e-2, batch_size=16),
    "vision8": TTASettings(steps=500, lr=2e-3, batch_size=16),
    "vision14": TTASettings(steps=300, lr=3e-3, batch_size=16),
    "vision20": TTASettings(steps=250, lr=4e-3, batch_size=16),
    "shift5": TTASettings(steps=500, lr=2e-3, batch_size=16),  # vision8's backbone size and settings, 5 tasks
}
DEFAULT_TTA = TTASettings(steps=500, lr=1e-3, batch_size=16)  # AdaMerging's 500 iterations, paper lr and batch


def tta_settings(suite: str, steps: int | None = None) -> TTASettings:
    """The suite's adaptation settings; `steps` overrides the step count (quick runs)."""
    settings = TTA.get(suite, DEFAULT_TTA)
    return settings if steps is None else TTASettings(steps, settings.lr, settings.batch_size)


def select_methods(names: list[str] | None, suite: str | None = None) -> list[BenchMethod]:
    """The named methods in table order (all when None), with the suite's smaller grids; unknown names are a user error."""
    unknown = [n for n in names or () if n not in BY_NAME]
    if unknown:
        raise MergeInputError(f"unknown benchmark method(s) {', '.join(unknown)}", f"use some of: {', '.join(BY_NAME)}")
    grids = SUITE_GRIDS.get(suite or "", {})
    return [replace(m, grid=grids.get(m.name, m.grid)) for m in METHODS if not names or m.name in set(names)]
