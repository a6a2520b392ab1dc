"""The baselines' schedules, which ignore performance (docs/method.md §4).

- ``fixed``: τ constant for the whole run (VLM-R1, τ = 0.5).
- ``none``: no threshold (the Raw-IoU baseline's ``reward.kind=raw_iou`` reads none).
- ``v_triune``: ε stepping by training fraction t/T: t/T ≤ f_1 -> ε_0, t/T ≤ f_2 -> ε_1, else ε_2
  (V-Triune's gated IoU ``IoU · 1[IoU ≥ ε(t/T)]`` is ``reward.kind=gated_iou``); the paper
  preset (0.85/0.95/0.99) and the MedLoc-range one (0.3/0.5/0.8) are two YAMLs of it.
- ``fixed_step``: τ going from τ_0 to τ_target in n equal raises at t/T = span·i/n (i = 1..n),
  whatever the model does; the conservative / moderate / aggressive presets are spans 0.8 / 0.5 /
  0.2 (three YAMLs).

Progress is ``t / T`` with t the 0-based step about to be rewarded and T = ``total_steps``; it is
rounded to ``PROGRESS_DECIMALS`` places before comparison with a boundary, so that e.g. step 20 of
100 is exactly at the 0.2 boundary.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from medloc.curriculum.base import Scheduler, round_tau
from medloc.curriculum.config import ScheduleConfig, check_range
from medloc.curriculum.window import WindowStats

__all__ = [
    "PROGRESS_DECIMALS",
    "FixedConfig",
    "FixedScheduler",
    "FixedStepConfig",
    "NoThresholdConfig",
    "NoThresholdScheduler",
    "ProgressScheduler",
    "VTriuneConfig",
    "preset_threshold",
    "v_triune_threshold",
]

PROGRESS_DECIMALS = 9


def v_triune_threshold(progress: float, fractions: Sequence[float], eps: Sequence[float]) -> float:
    """ε(t/T) = eps[i], i = number of fractions strictly below t/T (docs/method.md §4).

    Preset (V-Triune): fractions (0.10, 0.25), eps (0.85, 0.95, 0.99), i.e. t/T ≤ 0.10 -> 0.85,
    t/T ≤ 0.25 -> 0.95, else 0.99.
    """
    if len(eps) != len(fractions) + 1:
        raise ValueError(f"need len(eps) == len(fractions) + 1, got {len(eps)} and {len(fractions)}")
    p = round(progress, PROGRESS_DECIMALS)
    i = sum(1 for f in fractions if p > round(f, PROGRESS_DECIMALS))
    return float(eps[i])


def preset_threshold(progress: float, *, tau0: float, tau_target: float, span: float,
                     n_raises: int) -> float:
    """τ(t/T) of a fixed preset: τ_0 + (τ_target − τ_0)·i/n, i = #{j ≤ n : t/T ≥ span·j/n}.

    docs/method.md §4 (ASSUMED): from 0.3 to 0.8 in 4 equal raises over the first 80% / 50% / 20%
    of the steps (conservative / moderate / aggressive span). Rounded to 6 decimals.
    """
    if n_raises < 1:
        raise ValueError(f"n_raises={n_raises} must be >= 1")
    p = round(progress, PROGRESS_DECIMALS)
    i = sum(1 for j in range(1, n_raises + 1) if p >= round(span * j / n_raises, PROGRESS_DECIMALS))
    return round_tau(tau0 + (tau_target - tau0) * i / n_raises)


class FixedScheduler(Scheduler):
    """τ constant (VLM-R1 baseline, docs/method.md §4)."""

    def __init__(self, *, tau: float, op: str) -> None:
        super().__init__(schedule="fixed", op=op)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau} must be in [0, 1]")
        self._tau = float(tau)

    @property
    def tau(self) -> float:
        return self._tau

    def _advance(self, step: int, ious: np.ndarray) -> WindowStats | None:
        return None


class NoThresholdScheduler(Scheduler):
    """No threshold (for the Raw-IoU baseline's reward = IoU, docs/method.md §4). ``tau`` is None."""

    def __init__(self, *, op: str = ">=") -> None:
        super().__init__(schedule="none", op=op)

    @property
    def tau(self) -> None:
        return None

    def _advance(self, step: int, ious: np.ndarray) -> WindowStats | None:
        return None


class ProgressScheduler(Scheduler):
    """Threshold as a function of training progress t/T only (V-Triune and the fixed presets)."""

    def __init__(self, *, schedule: str, op: str, total_steps: int,
                 threshold_at: Callable[[float], float]) -> None:
        super().__init__(schedule=schedule, op=op)
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1 for a progress-based schedule")
        self.total_steps = int(total_steps)
        self._threshold_at = threshold_at

    def threshold_for_step(self, step: int) -> float:
        """The threshold used to reward 0-based ``step``."""
        return self._threshold_at(step / self.total_steps)

    @property
    def tau(self) -> float:
        return self.threshold_for_step(self.next_step)

    def _advance(self, step: int, ious: np.ndarray) -> WindowStats | None:
        return None

    def _extra_state(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if int(state["total_steps"]) != self.total_steps:
            raise ValueError(
                f"{self.schedule} state was saved with total_steps={state['total_steps']} but this "
                f"scheduler has total_steps={self.total_steps}; τ(t/T) would differ on resume"
            )


# ----------------------------------------------------------------------------------- configs


@dataclass
class FixedConfig(ScheduleConfig):
    """τ constant: the VLM-R1 baseline (docs/method.md §4), ``conf/curriculum/fixed.yaml``."""

    schedule: str = "fixed"
    tau: float = 0.5  # the VLM-R1 threshold (paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("tau", self.tau, 0.0, 1.0)

    def build(self, total_steps: int) -> FixedScheduler:
        return FixedScheduler(tau=self.tau, op=self.op)


@dataclass
class NoThresholdConfig(ScheduleConfig):
    """No threshold: the schedule of ``reward.kind=raw_iou`` (docs/method.md §4), ``conf/curriculum/none.yaml``."""

    schedule: str = "none"
    has_threshold: ClassVar[bool] = False

    def build(self, total_steps: int) -> NoThresholdScheduler:
        return NoThresholdScheduler(op=self.op)


@dataclass
class VTriuneConfig(ScheduleConfig):
    """ε(t/T) in steps (docs/method.md §4): ``conf/curriculum/v_triune.yaml`` / ``v_triune_medloc_range.yaml``."""

    schedule: str = "v_triune"
    # ε = eps[i] where i = number of fractions strictly below t/T: t/T <= 0.10 -> eps[0],
    # t/T <= 0.25 -> eps[1], else eps[2] (V-Triune paper preset). The MedLoc-range preset's
    # eps 0.3 / 0.5 / 0.8 is ASSUMED (docs/method.md §4).
    fractions: list[float] = field(default_factory=lambda: [0.10, 0.25])
    eps: list[float] = field(default_factory=lambda: [0.85, 0.95, 0.99])

    def __post_init__(self) -> None:
        super().__post_init__()
        fr = list(self.fractions)
        for i, f in enumerate(fr):
            check_range(f"fractions[{i}]", f, 0.0, 1.0, lo_open=True, hi_open=True)
        if any(b <= a for a, b in itertools.pairwise(fr)):
            raise ValueError(f"curriculum.fractions={fr} must be strictly increasing")
        eps = list(self.eps)
        if len(eps) != len(fr) + 1:
            raise ValueError(
                f"curriculum.eps has {len(eps)} values; need len(fractions)+1 = {len(fr) + 1}"
            )
        for i, e in enumerate(eps):
            check_range(f"eps[{i}]", e, 0.0, 1.0)

    def build(self, total_steps: int) -> ProgressScheduler:
        fractions = [float(f) for f in self.fractions]
        eps = [float(e) for e in self.eps]
        return ProgressScheduler(
            schedule=self.schedule, op=self.op, total_steps=total_steps,
            threshold_at=lambda p: v_triune_threshold(p, fractions, eps),
        )


@dataclass
class FixedStepConfig(ScheduleConfig):
    """τ raised on a preset clock (docs/method.md §4): ``conf/curriculum/fixed_{conservative,moderate,aggressive}.yaml``."""

    schedule: str = "fixed_step"
    tau0: float = 0.3  # start (the paper's τ_0)
    tau_target: float = 0.8  # end (the paper's τ_target)
    # τ goes tau0 -> tau_target in `n_raises` equal raises at t/T = span·i/n_raises, i = 1..n_raises.
    # ASSUMED (docs/method.md §4): 4 raises over the first 80% / 50% / 20% of the steps (conservative /
    # moderate / aggressive).
    n_raises: int = 4
    span: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("tau0", self.tau0, 0.0, 1.0)
        check_range("tau_target", self.tau_target, 0.0, 1.0)
        if not self.tau0 < self.tau_target:
            raise ValueError(
                f"curriculum.tau0={self.tau0} must be < tau_target={self.tau_target} (both in [0, 1])"
            )
        if isinstance(self.n_raises, bool) or not isinstance(self.n_raises, int) or self.n_raises < 1:
            raise ValueError(f"curriculum.n_raises={self.n_raises!r} must be an integer >= 1")
        check_range("span", self.span, 0.0, 1.0, lo_open=True)

    def build(self, total_steps: int) -> ProgressScheduler:
        tau0, tau_target = float(self.tau0), float(self.tau_target)
        span, n = float(self.span), int(self.n_raises)
        return ProgressScheduler(
            schedule=self.schedule, op=self.op, total_steps=total_steps,
            threshold_at=lambda p: preset_threshold(p, tau0=tau0, tau_target=tau_target,
                                                    span=span, n_raises=n),
        )
