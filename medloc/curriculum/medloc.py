"""The MedLoc-R1 performance-aware threshold scheduler (PAPER.md §3).

At every step k, once the sliding window holds N steps, the statistics of the window under the
current τ_k decide whether to raise the threshold:

    C_k = (r̄_k >= P(τ_k)) ∧ (σ_r,k <= S(τ_k)) ∧ (m̄_k >= Δ)
    if C_k:  τ_{k+1} = round(min(τ_k + δ(τ_k), τ_target), 6);  refresh the window

Each of the three checks can be switched off (the paper's criteria ablation). The pure pieces —
(P, S) lookup, the three step-size policies, the decision — are module-level functions with
explicit arguments; :class:`MedLocScheduler` only holds state.

Comparisons of a statistic with its bound use the statistic rounded to ``STAT_DECIMALS``
places, so a value that is mathematically on the bound (a hit rate of exactly 24/30 = 0.8, a
margin 0.75 − 0.65 that floating point gives as 0.09999999999999998) counts as on the bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from medloc.curriculum.base import Scheduler, round_tau
from medloc.curriculum.config import RefreshMode, StdOver, StepPolicy
from medloc.curriculum.window import WindowStats, WindowTracker

__all__ = [
    "STAT_DECIMALS",
    "Decision",
    "MedLocScheduler",
    "cosine_step",
    "decide",
    "linear_step",
    "next_tau",
    "pass_criteria",
    "piecewise_step",
    "step_size",
]

STAT_DECIMALS = 9


def _band_row(tau: float, rows: Sequence[Sequence[float]]) -> Sequence[float]:
    """The row whose lower τ edge is the largest one <= τ (rows sorted by edge)."""
    chosen = None
    for row in rows:
        if row[0] <= tau:
            chosen = row
    if chosen is None:
        raise ValueError(f"τ={tau} is below the first band edge {rows[0][0]}")
    return chosen


def pass_criteria(tau: float, table: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(P(τ), S(τ)) from rows ``[lower_edge, P, S]`` (PAPER.md §3; default table ASSUMED)."""
    row = _band_row(tau, table)
    return float(row[1]), float(row[2])


def piecewise_step(tau: float, bands: Sequence[Sequence[float]]) -> float:
    """δ(τ) from rows ``[lower_edge, δ]`` (PAPER.md §3: 0.15 / 0.10 / 0.05, edges ASSUMED)."""
    return float(_band_row(tau, bands)[1])


def linear_step(tau: float, *, tau0: float, tau_target: float, delta0: float,
                delta_min: float) -> float:
    """δ(τ) = max(δ_0 · (1 − (τ − τ_0)/(τ_target − τ_0)), δ_min)   (PAPER.md §3)."""
    frac = (tau - tau0) / (tau_target - tau0)
    return max(delta0 * (1.0 - frac), delta_min)


def cosine_step(tau: float, *, tau0: float, tau_target: float, delta0: float,
                delta_min: float) -> float:
    """δ(τ) = max(δ_0 · ½(1 + cos(π (τ − τ_0)/(τ_target − τ_0))), δ_min)   (PAPER.md §3)."""
    frac = (tau - tau0) / (tau_target - tau0)
    return max(delta0 * 0.5 * (1.0 + math.cos(math.pi * frac)), delta_min)


def step_size(tau: float, policy: str, *, tau0: float, tau_target: float, delta0: float,
              delta_min: float, bands: Sequence[Sequence[float]]) -> float:
    """δ(τ) for ``policy`` in ("piecewise", "linear", "cosine")."""
    if policy == "piecewise":
        return piecewise_step(tau, bands)
    elif policy == "linear":
        return linear_step(tau, tau0=tau0, tau_target=tau_target, delta0=delta0, delta_min=delta_min)
    elif policy == "cosine":
        return cosine_step(tau, tau0=tau0, tau_target=tau_target, delta0=delta0, delta_min=delta_min)
    raise ValueError(f"unknown step policy {policy!r}; allowed: {get_args(StepPolicy)}")


def next_tau(tau: float, delta: float, tau_target: float) -> float:
    """τ_{k+1} = min(τ_k + δ, τ_target), rounded to 6 decimals (PAPER.md §3)."""
    return round_tau(min(tau + delta, tau_target))


@dataclass(frozen=True)
class Decision:
    """Outcome of the multi-condition rule: each check's result and the combined verdict."""

    pass_reward: bool
    pass_stability: bool
    pass_margin: bool
    raise_tau: bool


def decide(stats: WindowStats, *, p: float, s: float, margin_delta: float, check_reward: bool,
           check_stability: bool, check_margin: bool) -> Decision:
    """C_k = (r̄ >= P) ∧ (σ <= S) ∧ (m̄ >= Δ), a switched-off check counting as passed (PAPER.md §3)."""
    pass_reward = round(stats.hit_rate, STAT_DECIMALS) >= p
    pass_stability = round(stats.std, STAT_DECIMALS) <= s
    pass_margin = round(stats.margin, STAT_DECIMALS) >= margin_delta
    verdict = ((pass_reward or not check_reward)
               and (pass_stability or not check_stability)
               and (pass_margin or not check_margin))
    return Decision(pass_reward, pass_stability, pass_margin, verdict)


class MedLocScheduler(Scheduler):
    """MedLoc-R1: sliding-window tracker + multi-condition raise + step policy + refresh."""

    def __init__(
        self,
        *,
        window: int,
        refresh: str,
        step: str,
        tau0: float,
        tau_target: float,
        delta: float,
        delta0: float,
        delta_min: float,
        check_reward: bool,
        check_stability: bool,
        check_margin: bool,
        std_over: str,
        pass_table: Sequence[Sequence[float]],
        piecewise_bands: Sequence[Sequence[float]],
        op: str,
    ) -> None:
        super().__init__(schedule="medloc", reward_kind="binary", op=op)
        if refresh not in get_args(RefreshMode):
            raise ValueError(f"refresh={refresh!r}; allowed: {get_args(RefreshMode)}")
        if step not in get_args(StepPolicy):
            raise ValueError(f"step={step!r}; allowed: {get_args(StepPolicy)}")
        if std_over not in get_args(StdOver):
            raise ValueError(f"std_over={std_over!r}; allowed: {get_args(StdOver)}")
        if not 0.0 <= tau0 < tau_target <= 1.0:
            raise ValueError(f"need 0 <= tau0 < tau_target <= 1, got tau0={tau0}, tau_target={tau_target}")
        self.refresh = refresh
        self.step_policy = step
        self.tau0 = float(tau0)
        self.tau_target = float(tau_target)
        self.delta = float(delta)
        self.delta0 = float(delta0)
        self.delta_min = float(delta_min)
        self.check_reward = bool(check_reward)
        self.check_stability = bool(check_stability)
        self.check_margin = bool(check_margin)
        self.std_over = std_over
        self.pass_table = [[float(x) for x in row] for row in pass_table]
        self.piecewise_bands = [[float(x) for x in row] for row in piecewise_bands]
        self._tracker = WindowTracker(window)
        self._tau = round_tau(tau0)
        self._last_decision: Decision | None = None

    @property
    def tau(self) -> float:
        return self._tau

    @property
    def window(self) -> WindowTracker:
        """The tracker (read it; do not mutate it from outside)."""
        return self._tracker

    def _advance(self, step: int, ious: np.ndarray) -> WindowStats | None:
        self._tracker.append(ious)
        self._last_decision = None
        if not self._tracker.is_full:  # the tracker decides only on a full window (§3)
            return None
        tau = self._tau
        stats = self._tracker.statistics(tau, self.op, self.std_over)
        p, s = pass_criteria(tau, self.pass_table)
        decision = decide(stats, p=p, s=s, margin_delta=self.delta, check_reward=self.check_reward,
                          check_stability=self.check_stability, check_margin=self.check_margin)
        self._last_decision = decision
        if decision.raise_tau and tau < self.tau_target:
            delta = step_size(tau, self.step_policy, tau0=self.tau0, tau_target=self.tau_target,
                              delta0=self.delta0, delta_min=self.delta_min,
                              bands=self.piecewise_bands)
            self._tau = next_tau(tau, delta, self.tau_target)
            self._tracker.refresh(self.refresh)
        return stats

    def _decision_metrics(self) -> dict[str, float]:
        d = self._last_decision
        if d is None:
            return {}
        return {
            "curriculum/pass_reward": float(d.pass_reward),
            "curriculum/pass_stability": float(d.pass_stability),
            "curriculum/pass_margin": float(d.pass_margin),
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"tau": self._tau, "tracker": self._tracker.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        tau = float(state["tau"])
        if not self.tau0 <= tau <= self.tau_target:
            raise ValueError(f"state tau={tau} is outside [tau0, tau_target]=[{self.tau0}, {self.tau_target}]")
        self._tracker.load_state_dict(state["tracker"])
        self._tau = tau
        self._last_decision = None
