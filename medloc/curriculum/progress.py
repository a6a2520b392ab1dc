"""The baselines' schedules, which ignore performance (PAPER.md §4).

- ``fixed``: τ constant for the whole run (VLM-R1, τ = 0.5).
- ``raw_iou``: no threshold; the reward is the IoU itself.
- ``v_triune`` / ``v_triune_medloc_range``: gated IoU ``IoU · 1[IoU ≥ ε(t/T)]`` with ε stepping
  by training fraction t/T: t/T ≤ f_1 -> ε_0, t/T ≤ f_2 -> ε_1, else ε_2.
- ``fixed_conservative`` / ``fixed_moderate`` / ``fixed_aggressive``: binary reward with τ going
  from τ_0 to τ_target in n equal raises at t/T = span·i/n (i = 1..n), whatever the model does.

Progress is ``t / T`` with t the 0-based step about to be rewarded and T = ``total_steps``; it is
rounded to ``PROGRESS_DECIMALS`` places before comparison with a boundary, so that e.g. step 20 of
100 is exactly at the 0.2 boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medloc.curriculum.base import Scheduler, round_tau
from medloc.curriculum.window import WindowStats

__all__ = [
    "PROGRESS_DECIMALS",
    "FixedScheduler",
    "ProgressScheduler",
    "RawIoUScheduler",
    "preset_threshold",
    "v_triune_threshold",
]

PROGRESS_DECIMALS = 9


def v_triune_threshold(progress: float, fractions: Sequence[float], eps: Sequence[float]) -> float:
    """ε(t/T) = eps[i], i = number of fractions strictly below t/T (PAPER.md §4).

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

    PAPER.md §4 (ASSUMED): from 0.3 to 0.8 in 4 equal raises over the first 80% / 50% / 20%
    of the steps (conservative / moderate / aggressive span). Rounded to 6 decimals.
    """
    if n_raises < 1:
        raise ValueError(f"n_raises={n_raises} must be >= 1")
    p = round(progress, PROGRESS_DECIMALS)
    i = sum(1 for j in range(1, n_raises + 1) if p >= round(span * j / n_raises, PROGRESS_DECIMALS))
    return round_tau(tau0 + (tau_target - tau0) * i / n_raises)


class FixedScheduler(Scheduler):
    """τ constant (VLM-R1 baseline, PAPER.md §4)."""

    def __init__(self, *, tau: float, op: str) -> None:
        super().__init__(schedule="fixed", reward_kind="binary", op=op)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau} must be in [0, 1]")
        self._tau = float(tau)

    @property
    def tau(self) -> float:
        return self._tau

    def _advance(self, step: int, ious: np.ndarray) -> WindowStats | None:
        return None


class RawIoUScheduler(Scheduler):
    """No threshold: reward = IoU (Raw-IoU baseline, PAPER.md §4). ``tau`` is None."""

    def __init__(self, *, op: str = ">=") -> None:
        super().__init__(schedule="raw_iou", reward_kind="raw_iou", op=op)

    @property
    def tau(self) -> None:
        return None

    def _advance(self, step: int, ious: np.ndarray) -> WindowStats | None:
        return None


class ProgressScheduler(Scheduler):
    """Threshold as a function of training progress t/T only (V-Triune and the fixed presets)."""

    def __init__(self, *, schedule: str, reward_kind: str, op: str, total_steps: int,
                 threshold_at: Callable[[float], float]) -> None:
        super().__init__(schedule=schedule, reward_kind=reward_kind, op=op)
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
