"""The one interface every threshold schedule implements (docs/method.md §3–4).

Usage in a training loop (steps are 0-based and contiguous: 0, 1, 2, ...)::

    sched = build_scheduler(cfg, total_steps)
    for step in range(start, total_steps):
        rewards = accuracy_reward(ious, cfg.reward.kind, sched.tau, sched.op)  # τ for THIS step
        ...
        metrics = sched.observe(step, all_ious_of_this_step)  # gathered across ranks first

A schedule produces a threshold; what the reward does with it is the reward's business
(``reward.kind``: ``binary`` 1[IoU ≥ τ], ``gated_iou`` IoU·1[IoU ≥ τ] — V-Triune calls this
threshold ε —, ``raw_iou`` reads none). ``tau`` is the threshold for the next step to be observed
(``None`` for the ``none`` schedule). ``observe`` returns

- ``curriculum/tau``     the threshold used for the observed step (absent when there is none),
- ``curriculum/raised``  1.0 if τ changes after this step, else 0.0,
- ``curriculum/tau_next`` the threshold for the step after (absent when there is none): equal to
  ``curriculum/tau`` unless raised; a run that raises at its last step logs its final τ here only,
- ``curriculum/raises``  number of raises so far,
- ``curriculum/window_hit_rate``, ``curriculum/window_std``, ``curriculum/window_margin``: the
  MedLoc-R1 window statistics under the τ used for the step; ABSENT (not NaN, so JSON logs stay
  valid JSON) while the window is not full and for schedules without a window,
- MedLoc-R1 only, with a full window: ``curriculum/pass_reward``, ``curriculum/pass_stability``,
  ``curriculum/pass_margin`` (1.0/0.0, each check's outcome whether or not it is switched on).

A raise is recorded at the step whose statistics triggered it: the record with ``step=k``
means steps ``k+1, ...`` use ``new_tau``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medloc.curriculum.window import WindowStats, validate_step_ious

__all__ = ["RaiseRecord", "Scheduler", "round_tau"]

TAU_DECIMALS = 6  # τ is rounded after every raise (0.3 + 0.15 = 0.44999999999999996), docs/method.md §3


def round_tau(value: float) -> float:
    """Round a threshold to ``TAU_DECIMALS`` places so band lookups see 0.45, not 0.4499…96."""
    return round(float(value), TAU_DECIMALS)


@dataclass(frozen=True)
class RaiseRecord:
    """One threshold change: at ``step``, τ went ``old_tau`` -> ``new_tau``.

    ``hit_rate``, ``std`` and ``margin`` are the window statistics the MedLoc-R1 decision saw
    (None for progress-based schedules, which do not look at performance).
    """

    step: int
    old_tau: float
    new_tau: float
    hit_rate: float | None = None
    std: float | None = None
    margin: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RaiseRecord:
        def opt(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(step=int(d["step"]), old_tau=float(d["old_tau"]), new_tau=float(d["new_tau"]),
                   hit_rate=opt(d.get("hit_rate")), std=opt(d.get("std")), margin=opt(d.get("margin")))


class Scheduler(ABC):
    """Base class: step bookkeeping, raise history, metrics and state shared by all schedules."""

    #: the schedule name (a key of ``medloc.curriculum.SCHEDULES``)
    schedule: str

    def __init__(self, schedule: str, op: str) -> None:
        if op not in (">=", ">"):
            raise ValueError(f"op={op!r} must be '>=' or '>'")
        self.schedule = schedule
        self.op = op
        self._last_step = -1
        self._history: list[RaiseRecord] = []

    # ----------------------------------------------------------------- to implement
    @property
    @abstractmethod
    def tau(self) -> float | None:
        """Threshold for the next step to be observed (None when there is no threshold)."""

    @abstractmethod
    def _advance(self, step: int, ious: np.ndarray) -> WindowStats | None:
        """Consume one step's IoUs (``tau`` still is the τ used for that step) and update state.

        Returns the window statistics the decision saw, or None if there were none.
        """

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    # ----------------------------------------------------------------- shared
    @property
    def next_step(self) -> int:
        """The step number ``observe`` expects next."""
        return self._last_step + 1

    @property
    def history(self) -> list[RaiseRecord]:
        return list(self._history)

    @property
    def raises(self) -> int:
        return len(self._history)

    def observe(self, step: int, ious: np.ndarray | list[float]) -> dict[str, float]:
        """Feed the IoUs of ALL samples of finished ``step``; returns the curriculum metrics."""
        if int(step) != self.next_step:
            raise ValueError(
                f"{self.schedule} scheduler expected step {self.next_step}, got {step}: steps are "
                f"0-based and must be observed once each, in order"
            )
        arr = validate_step_ious(ious, where=f"step {step}")  # [M]
        tau_used = self.tau
        stats = self._advance(int(step), arr)
        self._last_step = int(step)
        tau_next = self.tau
        raised = tau_used is not None and tau_next is not None and tau_next != tau_used
        if raised:
            self._history.append(RaiseRecord(
                step=int(step), old_tau=float(tau_used), new_tau=float(tau_next),
                hit_rate=None if stats is None else stats.hit_rate,
                std=None if stats is None else stats.std,
                margin=None if stats is None else stats.margin,
            ))
        metrics: dict[str, float] = {}
        if tau_used is not None:
            metrics["curriculum/tau"] = float(tau_used)
        metrics["curriculum/raised"] = 1.0 if raised else 0.0
        if tau_next is not None:
            metrics["curriculum/tau_next"] = float(tau_next)
        metrics["curriculum/raises"] = float(self.raises)
        if stats is not None:
            metrics["curriculum/window_hit_rate"] = stats.hit_rate
            metrics["curriculum/window_std"] = stats.std
            metrics["curriculum/window_margin"] = stats.margin
        metrics.update(self._decision_metrics())
        return metrics

    def _decision_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain ints, floats, lists, None)."""
        return {
            "schedule": self.schedule,
            "last_step": self._last_step,
            "history": [r.to_dict() for r in self._history],
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly what :meth:`state_dict` saved (same schedule and settings required)."""
        if state.get("schedule") != self.schedule:
            raise ValueError(
                f"cannot load a {state.get('schedule')!r} scheduler state into a {self.schedule!r} scheduler"
            )
        self._load_extra_state(state)
        self._last_step = int(state["last_step"])
        self._history = [RaiseRecord.from_dict(r) for r in state["history"]]

    def __repr__(self) -> str:
        tau = self.tau
        tau_s = "None" if tau is None else f"{tau:g}"
        return f"{type(self).__name__}(schedule={self.schedule!r}, tau={tau_s}, next_step={self.next_step})"
