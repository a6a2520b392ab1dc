"""The MedLoc-R1 sliding-window performance tracker (docs/method.md §3).

The window holds the IoUs of the last N training steps, one entry per step (all G·B samples of
that step, already gathered across ranks by the caller). It stores IoUs, not rewards, so that
its statistics are always evaluated under the *current* threshold τ_k, as the paper's formula
``r̄_k = 1/N Σ_t 1/G Σ_i 1[IoU ≥ τ_k]`` writes it. After a raise, the entries kept by the
refresh are re-read under the new τ.

Statistics (:func:`window_statistics`), for a full window W of N steps:

- hit rate   r̄ = mean over steps t ∈ W of (mean over samples of 1[IoU op τ])
- stability  σ  = population std of the N per-step mean rewards        (std_over="step_means",
                  ASSUMED, docs/method.md §3), or of all rewards in the window (std_over="all_rewards")
- margin     m̄ = mean over steps of (mean IoU of the step) − τ

Means are means of per-step means, as the paper's formula writes (identical to the pooled mean
when every step has the same number of samples).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import get_args

import numpy as np

from medloc.curriculum.config import RefreshMode, StdOver
from medloc.rewards import compare

__all__ = ["WindowStats", "WindowTracker", "refresh_keep_count", "validate_step_ious",
           "window_statistics"]


@dataclass(frozen=True)
class WindowStats:
    """The three statistics the raise decision reads (docs/method.md §3)."""

    hit_rate: float  # r̄_k
    std: float  # σ_r,k
    margin: float  # m̄_k


def validate_step_ious(ious: Iterable[float] | np.ndarray, *, where: str = "step") -> np.ndarray:
    """One step's IoUs as float64 ``[M]``, M >= 1, every value finite and in [0, 1].

    Parse failures must already be entered as 0.0 by the caller (docs/method.md §5).
    """
    arr = np.asarray(ious, dtype=np.float64).reshape(-1)  # [M]
    if arr.size == 0:
        raise ValueError(f"{where}: a step must contribute at least one IoU, got none")
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: IoU #{i} = {float(arr[i])!r} is not a number in [0, 1]")
    return arr


def _mean(values: Iterable[float]) -> float:
    """Mean with an exactly rounded sum (math.fsum), so 30 steps of hit rate 0.9 give 0.9."""
    vals = [float(v) for v in values]
    return math.fsum(vals) / len(vals)


def _pstd(values: Iterable[float]) -> float:
    """Population standard deviation (ddof = 0), fsum-based like :func:`_mean`."""
    vals = [float(v) for v in values]
    mu = _mean(vals)
    return math.sqrt(math.fsum((v - mu) ** 2 for v in vals) / len(vals))


def window_statistics(entries: Iterable[np.ndarray], tau: float, op: str,
                      std_over: str = "step_means") -> WindowStats:
    """r̄, σ and m̄ of the window ``entries`` (one IoU array per step) under threshold ``tau``."""
    steps = list(entries)
    if not steps:
        raise ValueError("window_statistics needs at least one step")
    rewards = [compare(e, tau, op).astype(np.float64) for e in steps]  # N x [M_t]
    step_means = [_mean(r) for r in rewards]  # [N] per-step hit rates
    step_iou_means = [_mean(e) for e in steps]  # [N] per-step mean IoUs
    if std_over == "step_means":
        std = _pstd(step_means)
    elif std_over == "all_rewards":
        std = _pstd(np.concatenate(rewards))
    else:
        raise ValueError(f"unknown std_over {std_over!r}; allowed: {get_args(StdOver)}")
    return WindowStats(hit_rate=_mean(step_means), std=std, margin=_mean(step_iou_means) - tau)


def refresh_keep_count(n_entries: int, window: int, mode: str) -> int:
    """How many of the newest entries a refresh keeps (docs/method.md §3, semi-preserved refresh).

    semi: keep the newest ``window // 2`` (drop the oldest half, paper default);
    quarter: drop the oldest ``window // 4``; full: drop all; none: keep all.
    Counts are taken relative to the window size N, then capped at the entries present.
    """
    if mode == "semi":
        keep = window // 2
    elif mode == "quarter":
        keep = window - window // 4
    elif mode == "full":
        keep = 0
    elif mode == "none":
        keep = window
    else:
        raise ValueError(f"unknown refresh mode {mode!r}; allowed: {get_args(RefreshMode)}")
    return min(keep, n_entries)


class WindowTracker:
    """A FIFO of the last ``window`` steps' IoU arrays."""

    def __init__(self, window: int) -> None:
        if window < 2:
            raise ValueError(f"window={window} must be >= 2")
        self.window = int(window)
        self._entries: deque[np.ndarray] = deque(maxlen=self.window)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def is_full(self) -> bool:
        return len(self._entries) == self.window

    @property
    def entries(self) -> list[np.ndarray]:
        """The entries, oldest first (copies: the tracker's state cannot be changed through them)."""
        return [e.copy() for e in self._entries]

    def append(self, ious: np.ndarray) -> None:
        """Add one step's IoUs (validated); the oldest entry falls out of a full window."""
        self._entries.append(validate_step_ious(ious).copy())

    def statistics(self, tau: float, op: str, std_over: str) -> WindowStats:
        return window_statistics(self._entries, tau, op, std_over)

    def refresh(self, mode: str) -> int:
        """Apply a refresh after a raise; returns how many entries were dropped."""
        keep = refresh_keep_count(len(self._entries), self.window, mode)
        dropped = len(self._entries) - keep
        for _ in range(dropped):
            self._entries.popleft()
        return dropped

    def state_dict(self) -> dict:
        """JSON-serialisable: ``{"window": N, "entries": [[iou, ...], ...]}`` oldest first."""
        return {"window": self.window, "entries": [e.tolist() for e in self._entries]}

    def load_state_dict(self, state: dict) -> None:
        if int(state["window"]) != self.window:
            raise ValueError(
                f"window state has window={state['window']}, this tracker has window={self.window}"
            )
        entries = [validate_step_ious(e, where=f"window entry {i}")
                   for i, e in enumerate(state["entries"])]
        if len(entries) > self.window:
            raise ValueError(f"window state has {len(entries)} entries > window={self.window}")
        self._entries = deque(entries, maxlen=self.window)
