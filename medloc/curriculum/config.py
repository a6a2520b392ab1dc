"""``CurriculumConfig``: every knob of every threshold schedule (PAPER.md §3, §4).

This dataclass is also the schema of the Hydra ``curriculum`` config group and of the replay
tool's ``key=value`` overrides, so its field names are part of the interface and its field
types are only those OmegaConf accepts (variants are ``str`` checked in ``__post_init__``
against the ``Literal`` aliases below). Defaults are the paper's values; every value the paper
does not give is marked ASSUMED with the PAPER.md section that discusses it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from medloc.rewards import CompareOp

ScheduleName = Literal[
    "medloc",  # MedLoc-R1 performance-aware curriculum (§3)
    "fixed",  # VLM-R1: τ = `tau` for the whole run (§4)
    "raw_iou",  # reward = IoU, no threshold (§4)
    "v_triune",  # IoU · 1[IoU >= ε(t/T)], V-Triune preset ε (§4)
    "v_triune_medloc_range",  # same fractions, ε in the MedLoc range (§4, ASSUMED)
    "fixed_conservative",  # τ0 -> τ_target in equal raises over the first 80% of steps (§4)
    "fixed_moderate",  # ... over the first 50% (§4)
    "fixed_aggressive",  # ... over the first 20% (§4)
]
RefreshMode = Literal["semi", "full", "quarter", "none"]
StepPolicy = Literal["piecewise", "linear", "cosine"]
StdOver = Literal["step_means", "all_rewards"]

MIN_STEP = 1e-6  # smallest step δ that survives rounding τ to 6 decimals

__all__ = ["CompareOp", "CurriculumConfig", "RefreshMode", "ScheduleName", "StdOver", "StepPolicy"]


def _check_choice(name: str, value: object, alias: object) -> None:
    allowed = get_args(alias)
    if value not in allowed:
        raise ValueError(f"curriculum.{name}={value!r} is not allowed; choose one of {allowed}")


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and (value < hi if hi_open else value <= hi)
    )
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"curriculum.{name}={value!r} must be a number in {interval}")


def _check_edges(name: str, rows: list[list[float]], width: int, tau0: float) -> None:
    """Rows ``[lower_edge, ...]`` with strictly increasing edges, the first at or below τ0."""
    if len(rows) == 0:
        raise ValueError(f"curriculum.{name} must have at least one row")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"curriculum.{name}[{i}]={list(row)!r} must have {width} numbers")
        _check_range(f"{name}[{i}][0] (lower τ edge)", row[0], 0.0, 1.0)
    edges = [row[0] for row in rows]
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"curriculum.{name} lower τ edges {edges} must be strictly increasing")
    if edges[0] > tau0:
        raise ValueError(
            f"curriculum.{name} first lower τ edge {edges[0]} must be <= tau0={tau0} so every τ "
            f"the schedule reaches falls in a row"
        )


@dataclass
class CurriculumConfig:
    """Threshold-schedule configuration (PAPER.md §3–4). See the module docstring."""

    # Which schedule; one of ScheduleName.
    schedule: str = "medloc"

    # --- MedLoc-R1 (§3) -------------------------------------------------------------------
    window: int = 30  # N, steps in the sliding window (paper)
    refresh: str = "semi"  # window refresh on a raise: semi (keep newest N//2, paper), full, quarter, none
    step: str = "piecewise"  # step-size policy δ(τ): piecewise (paper default), linear, cosine
    tau0: float = 0.3  # τ_0 (paper); also the start of the fixed_* presets
    tau_target: float = 0.8  # τ_target (paper); also the end of the fixed_* presets
    delta: float = 0.10  # Δ, required IoU margin m̄ = mean IoU − τ (paper)
    delta0: float = 0.15  # δ_0 of linear/cosine decay. ASSUMED (PAPER.md §3): the piecewise first step
    delta_min: float = 0.02  # floor on δ for linear/cosine. ASSUMED (PAPER.md §3)
    check_reward: bool = True  # r̄ >= P(τ)  (criteria ablation switches, §3)
    check_stability: bool = True  # σ <= S(τ)
    check_margin: bool = True  # m̄ >= Δ
    # σ over: "step_means" = population std of the N per-step mean rewards. ASSUMED (PAPER.md §3);
    # "all_rewards" = population std of every reward in the window.
    std_over: str = "step_means"
    # (P, S) table as rows [lower τ edge, P, S]: the row with the largest edge <= τ applies.
    # ASSUMED (PAPER.md §3): τ < 0.60 -> (0.80, 0.20); 0.60 <= τ < 0.75 -> (0.75, 0.35);
    # τ >= 0.75 -> (0.55, 0.40).
    pass_table: list[list[float]] = field(
        default_factory=lambda: [[0.0, 0.80, 0.20], [0.60, 0.75, 0.35], [0.75, 0.55, 0.40]]
    )
    # Piecewise δ as rows [lower τ edge, δ]: δ = 0.15 / 0.10 / 0.05 (paper) with band edges
    # ASSUMED (PAPER.md §3): τ < 0.45, 0.45 <= τ < 0.70, τ >= 0.70, which gives
    # 0.30 -> 0.45 -> 0.55 -> 0.65 -> 0.75 -> 0.80.
    piecewise_bands: list[list[float]] = field(
        default_factory=lambda: [[0.0, 0.15], [0.45, 0.10], [0.70, 0.05]]
    )

    # --- comparison operator of every thresholded reward (§4) -----------------------------
    op: str = ">="  # ">=" as the paper writes; ">" as early VLM-R1 coded

    # --- fixed τ (VLM-R1 baseline, §4) ------------------------------------------------------
    tau: float = 0.5

    # --- V-Triune progress-based ε(t/T) (§4) ------------------------------------------------
    # ε = eps[i] where i = number of fractions strictly below t/T: t/T <= 0.10 -> eps[0],
    # t/T <= 0.25 -> eps[1], else eps[2] (V-Triune paper preset).
    vtriune_fractions: list[float] = field(default_factory=lambda: [0.10, 0.25])
    vtriune_eps: list[float] = field(default_factory=lambda: [0.85, 0.95, 0.99])
    # "v_triune_medloc_range" preset thresholds. ASSUMED (PAPER.md §4).
    vtriune_medloc_eps: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.8])

    # --- fixed-conservative / moderate / aggressive presets (§4) ------------------------------
    # τ goes tau0 -> tau_target in `fixed_raises` equal raises at t/T = span·i/fixed_raises,
    # i = 1..fixed_raises. ASSUMED (PAPER.md §4): 4 raises over the first 80% / 50% / 20%.
    fixed_raises: int = 4
    fixed_conservative_span: float = 0.8
    fixed_moderate_span: float = 0.5
    fixed_aggressive_span: float = 0.2

    def __post_init__(self) -> None:
        _check_choice("schedule", self.schedule, ScheduleName)
        _check_choice("refresh", self.refresh, RefreshMode)
        _check_choice("step", self.step, StepPolicy)
        _check_choice("op", self.op, CompareOp)
        _check_choice("std_over", self.std_over, StdOver)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"curriculum.window={self.window!r} must be an integer >= 2")
        for name in ("check_reward", "check_stability", "check_margin"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"curriculum.{name}={getattr(self, name)!r} must be true or false")
        _check_range("tau0", self.tau0, 0.0, 1.0)
        _check_range("tau_target", self.tau_target, 0.0, 1.0)
        if not self.tau0 < self.tau_target:
            raise ValueError(
                f"curriculum.tau0={self.tau0} must be < tau_target={self.tau_target} (both in [0, 1])"
            )
        _check_range("delta", self.delta, -1.0, 1.0)
        # δ below 1e-6 would vanish when τ is rounded to 6 decimals after a raise.
        _check_range("delta0", self.delta0, MIN_STEP, 1.0)
        _check_range("delta_min", self.delta_min, MIN_STEP, 1.0)
        if self.delta_min > self.delta0:
            raise ValueError(
                f"curriculum.delta_min={self.delta_min} must be <= delta0={self.delta0} (range [1e-6, delta0])"
            )
        _check_edges("pass_table", self.pass_table, 3, self.tau0)
        for i, (_, p, s) in enumerate(self.pass_table):
            _check_range(f"pass_table[{i}][1] (P)", p, 0.0, 1.0)
            _check_range(f"pass_table[{i}][2] (S)", s, 0.0, 1.0)
        _check_edges("piecewise_bands", self.piecewise_bands, 2, self.tau0)
        for i, (_, d) in enumerate(self.piecewise_bands):
            _check_range(f"piecewise_bands[{i}][1] (δ)", d, MIN_STEP, 1.0)
        _check_range("tau", self.tau, 0.0, 1.0)

        fr = list(self.vtriune_fractions)
        for i, f in enumerate(fr):
            _check_range(f"vtriune_fractions[{i}]", f, 0.0, 1.0, lo_open=True, hi_open=True)
        if any(b <= a for a, b in itertools.pairwise(fr)):
            raise ValueError(f"curriculum.vtriune_fractions={fr} must be strictly increasing")
        for name in ("vtriune_eps", "vtriune_medloc_eps"):
            eps = list(getattr(self, name))
            if len(eps) != len(fr) + 1:
                raise ValueError(
                    f"curriculum.{name} has {len(eps)} values; need len(vtriune_fractions)+1 = {len(fr) + 1}"
                )
            for i, e in enumerate(eps):
                _check_range(f"{name}[{i}]", e, 0.0, 1.0)

        if isinstance(self.fixed_raises, bool) or not isinstance(self.fixed_raises, int) or self.fixed_raises < 1:
            raise ValueError(f"curriculum.fixed_raises={self.fixed_raises!r} must be an integer >= 1")
        for name in ("fixed_conservative_span", "fixed_moderate_span", "fixed_aggressive_span"):
            _check_range(name, getattr(self, name), 0.0, 1.0, lo_open=True)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """All field names, in declaration order (the allowed override keys)."""
        return tuple(f.name for f in fields(cls))
