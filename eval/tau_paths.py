"""τ paths: the threshold a schedule used at each step of a run, replayed on recorded IoUs or
read from a trained run's ``metrics.jsonl``, and the first decision where two paths part.

Used by ``eval.replay_panel`` (the counterfactual replay of an ablation sweep) and by
``eval.table_spec`` (an ablation row whose trained runs took the full rule's τ path says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.runs import read_metrics_jsonl
from medloc.curriculum import build_scheduler
from medloc.curriculum.config import ScheduleConfig

__all__ = ["TauPath", "Trajectory", "first_difference", "replay_path", "trained_path"]

Trajectory = Sequence[tuple[int, np.ndarray]]  # [(step, IoUs of all samples of that step [M])]


@dataclass(frozen=True)
class TauPath:
    """τ over one run: ``taus[k]`` was used for the rewards of step ``steps[k]``; ``raised[k]``
    says whether the decision taken after that step raised it; ``final_tau`` is the τ after the
    last decision (None when unknown: a trained run that raised at its very last step and logged
    no ``curriculum/tau_next``, as runs made before that metric existed)."""

    steps: tuple[int, ...]
    taus: tuple[float, ...]
    raised: tuple[bool, ...]
    final_tau: float | None

    @property
    def n_raises(self) -> int:
        return sum(self.raised)

    def tau_after(self, k: int) -> float | None:
        """τ the decision after step index ``k`` led to (the next step's τ)."""
        return self.taus[k + 1] if k + 1 < len(self.taus) else self.final_tau

    def first_step_after(self, k: int) -> int:
        """The first step trained at the τ the decision after step index ``k`` set: the next
        logged step (``steps[k] + 1`` after the last one)."""
        return self.steps[k + 1] if k + 1 < len(self.steps) else self.steps[k] + 1

    def describe(self) -> str:
        """``0.1 →0.2@10 →0.3@26``: τ0, then each new τ at the FIRST STEP that uses it (the step
        after the decision that raised it), as the plots draw it (``steps-post``) and as
        ``metrics.jsonl`` logs it (``curriculum/tau`` of that step): one convention everywhere."""
        parts = [f"{self.taus[0]:g}" if self.taus else "—"]
        for k, up in enumerate(self.raised):
            if up:
                after = self.tau_after(k)
                at = self.first_step_after(k)
                parts.append(f"→{after:g}@{at}" if after is not None else f"→?@{at}")
        return " ".join(parts)


def replay_path(trajectory: Trajectory, cfg: ScheduleConfig | Mapping) -> TauPath:
    """The τ path ``cfg``'s schedule takes on recorded IoUs (no training): T = len(trajectory)."""
    sched = build_scheduler(cfg, total_steps=len(trajectory))
    taus: list[float] = []
    raised: list[bool] = []
    for i, (_, ious) in enumerate(trajectory):
        if sched.tau is None:
            raise ValueError(f"schedule {sched.schedule!r} has no threshold to replay")
        taus.append(float(sched.tau))
        metrics = sched.observe(i, ious)
        raised.append(bool(metrics["curriculum/raised"]))
    return TauPath(tuple(s for s, _ in trajectory), tuple(taus), tuple(raised), sched.tau)


def trained_path(run_dir: Path) -> TauPath | None:
    """The τ path a trained run logged (``curriculum/tau`` and ``curriculum/raised`` of each step
    of its ``metrics.jsonl``); None if it has none or logged no τ. A malformed line raises
    ValueError naming the file and line."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return None
    tau_by_step = read_metrics_jsonl(log, "curriculum/tau")
    raised_by_step = read_metrics_jsonl(log, "curriculum/raised")
    next_by_step = read_metrics_jsonl(log, "curriculum/tau_next")
    if not tau_by_step:
        return None
    steps = sorted(tau_by_step)
    taus = tuple(tau_by_step[s] for s in steps)
    raised = tuple(bool(raised_by_step.get(s, 0.0)) for s in steps)
    final = next_by_step.get(steps[-1], None if raised[-1] else taus[-1])
    return TauPath(tuple(steps), taus, raised, final)


def first_difference(path: TauPath, reference: TauPath) -> int | None:
    """The step of the first decision of ``path`` that differs from ``reference``'s (raise vs
    hold, or a raise to another τ), comparing the steps both have; None when every one agrees.
    A different starting τ counts as a difference at the first step."""
    n = min(len(path.taus), len(reference.taus))
    if n and path.taus[0] != reference.taus[0]:
        return path.steps[0]
    for k in range(n):
        if path.raised[k] != reference.raised[k] or (
                path.raised[k] and path.tau_after(k) != reference.tau_after(k)):
            return path.steps[k]
    return None
