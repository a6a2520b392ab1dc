"""IoU-threshold schedules: MedLoc-R1 (PAPER.md §3) and every baseline schedule (§4).

One entry point, one interface::

    from medloc.curriculum import CurriculumConfig, build_scheduler
    sched = build_scheduler(CurriculumConfig(schedule="medloc"), total_steps=1000)
    sched.tau, sched.reward_kind, sched.op      # what the reward of the next step uses
    metrics = sched.observe(step, ious)         # after each step, IoUs of all its samples
    sched.history, sched.state_dict(), sched.load_state_dict(d)

See :mod:`medloc.curriculum.base` for the exact contract, :mod:`.medloc` for the MedLoc-R1 rule,
:mod:`.progress` for the baselines and :mod:`.replay` for the offline replay command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medloc.curriculum.base import RaiseRecord, Scheduler
from medloc.curriculum.config import CurriculumConfig
from medloc.curriculum.medloc import MedLocScheduler
from medloc.curriculum.progress import (
    FixedScheduler,
    ProgressScheduler,
    RawIoUScheduler,
    preset_threshold,
    v_triune_threshold,
)

__all__ = [
    "CurriculumConfig",
    "FixedScheduler",
    "MedLocScheduler",
    "ProgressScheduler",
    "RaiseRecord",
    "RawIoUScheduler",
    "Scheduler",
    "build_scheduler",
]


def _plain(value: Any) -> Any:
    """ListConfig / tuples -> plain nested lists (other values unchanged)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return value
    return [_plain(v) for v in value]


def build_scheduler(cfg: CurriculumConfig, total_steps: int) -> Scheduler:
    """The scheduler ``cfg.schedule`` names. ``total_steps`` (T >= 1) drives progress schedules.

    ``cfg`` may also be any object with the same attributes (e.g. an OmegaConf ``DictConfig`` of
    the ``curriculum`` group); it is then copied into a ``CurriculumConfig`` so that it is
    validated exactly like one.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be an integer >= 1")
    if not isinstance(cfg, CurriculumConfig):
        cfg = CurriculumConfig(**{k: _plain(getattr(cfg, k)) for k in CurriculumConfig.field_names()})
    name = cfg.schedule
    if name == "medloc":
        return MedLocScheduler(
            window=cfg.window, refresh=cfg.refresh, step=cfg.step, tau0=cfg.tau0,
            tau_target=cfg.tau_target, delta=cfg.delta, delta0=cfg.delta0,
            delta_min=cfg.delta_min, check_reward=cfg.check_reward,
            check_stability=cfg.check_stability, check_margin=cfg.check_margin,
            std_over=cfg.std_over, pass_table=cfg.pass_table,
            piecewise_bands=cfg.piecewise_bands, op=cfg.op,
        )
    elif name == "fixed":
        return FixedScheduler(tau=cfg.tau, op=cfg.op)
    elif name == "raw_iou":
        return RawIoUScheduler(op=cfg.op)
    elif name in ("v_triune", "v_triune_medloc_range"):
        fractions = [float(f) for f in cfg.vtriune_fractions]
        eps = [float(e) for e in (cfg.vtriune_eps if name == "v_triune" else cfg.vtriune_medloc_eps)]
        return ProgressScheduler(
            schedule=name, reward_kind="gated_iou", op=cfg.op, total_steps=total_steps,
            threshold_at=lambda p: v_triune_threshold(p, fractions, eps),
        )
    elif name in ("fixed_conservative", "fixed_moderate", "fixed_aggressive"):
        span = float(getattr(cfg, f"{name}_span"))
        tau0, tau_target, n = float(cfg.tau0), float(cfg.tau_target), int(cfg.fixed_raises)
        return ProgressScheduler(
            schedule=name, reward_kind="binary", op=cfg.op, total_steps=total_steps,
            threshold_at=lambda p: preset_threshold(p, tau0=tau0, tau_target=tau_target,
                                                    span=span, n_raises=n),
        )
    raise ValueError(f"unknown curriculum.schedule {name!r}; see CurriculumConfig for the allowed names")
