"""IoU-threshold schedules: MedLoc-R1 (docs/method.md §3) and every baseline schedule (§4).

One entry point, one interface::

    from medloc.curriculum import build_scheduler, schedule_config
    sched = build_scheduler(schedule_config({"schedule": "medloc"}), total_steps=1000)
    sched.tau, sched.op                         # the threshold of the next step, its operator
    metrics = sched.observe(step, ious)         # after each step, IoUs of all its samples
    sched.history, sched.state_dict(), sched.load_state_dict(d)

A schedule produces a threshold (and statistics); the reward kind that reads it is
``reward.kind`` (medloc/rewards.py). Each schedule is one dataclass (its knobs, ``build()``) in its
module; :data:`SCHEDULES` is the one line per schedule that names it. See
:mod:`medloc.curriculum.base` for the contract, :mod:`.medloc` for the MedLoc-R1 rule,
:mod:`.progress` for the baselines and :mod:`.replay` for the offline replay command. The README
section "Adding a threshold schedule" walks through adding one.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any

from medloc.curriculum.base import RaiseRecord, Scheduler
from medloc.curriculum.config import ScheduleConfig
from medloc.curriculum.medloc import MedLocConfig, MedLocScheduler
from medloc.curriculum.progress import (
    FixedConfig,
    FixedScheduler,
    FixedStepConfig,
    NoThresholdConfig,
    NoThresholdScheduler,
    ProgressScheduler,
    VTriuneConfig,
)

__all__ = [
    "SCHEDULES",
    "FixedConfig",
    "FixedScheduler",
    "FixedStepConfig",
    "MedLocConfig",
    "MedLocScheduler",
    "NoThresholdConfig",
    "NoThresholdScheduler",
    "ProgressScheduler",
    "RaiseRecord",
    "ScheduleConfig",
    "Scheduler",
    "VTriuneConfig",
    "build_scheduler",
    "known_keys",
    "schedule_config",
]

SCHEDULES: dict[str, type[ScheduleConfig]] = {
    "medloc": MedLocConfig,  # MedLoc-R1 performance-aware curriculum (§3)
    "fixed": FixedConfig,  # τ constant: VLM-R1 (§4)
    "none": NoThresholdConfig,  # no threshold: for reward.kind=raw_iou (§4)
    "v_triune": VTriuneConfig,  # ε(t/T) in steps: V-Triune (§4)
    "fixed_step": FixedStepConfig,  # τ0 -> τ_target in equal raises over the first `span` of T (§4)
}
"""Schedule name (``curriculum.schedule``) -> its config dataclass. A new schedule adds one line."""


def _plain(value: Any) -> Any:
    """ListConfig / tuples -> plain nested lists (other values unchanged)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return value
    return [_plain(v) for v in value]


def known_keys() -> dict[str, Any]:
    """Every key some schedule has -> its type (the first schedule declaring it wins).

    A ``curriculum`` node may hold keys of other schedules (a preset tunes MedLoc-R1's window
    whatever schedule a run picks); a key that no schedule has is a mistake.
    """
    out: dict[str, Any] = {}
    for cls in SCHEDULES.values():
        for name, hint in typing.get_type_hints(cls).items():
            if name in cls.field_names():
                out.setdefault(name, hint)
    return out


def schedule_config(values: Mapping[str, Any] | Any) -> ScheduleConfig:
    """The validated config of the schedule ``values["schedule"]`` names.

    ``values`` is a mapping (a ``curriculum`` DictConfig, a dict) or a ScheduleConfig. Keys of
    other schedules are dropped; a key that no schedule has raises, naming the allowed keys.
    """
    if isinstance(values, ScheduleConfig):
        return values
    items = {str(k): values[k] for k in values}
    name = items.get("schedule", "medloc")
    if name not in SCHEDULES:
        raise ValueError(
            f"curriculum.schedule={name!r} is not allowed; choose one of {tuple(SCHEDULES)}"
        )
    allowed = known_keys()
    unknown = sorted(k for k in items if k not in allowed)
    if unknown:
        raise ValueError(f"unknown curriculum key(s) {unknown}; the schedules have {sorted(allowed)}")
    cls = SCHEDULES[name]
    own = cls.field_names()
    return cls(**{k: _plain(v) for k, v in items.items() if k in own})


def build_scheduler(cfg: ScheduleConfig | Mapping[str, Any], total_steps: int) -> Scheduler:
    """The scheduler ``cfg.schedule`` names. ``total_steps`` (T >= 1) drives progress schedules.

    ``cfg`` may also be a mapping (e.g. an OmegaConf ``DictConfig`` of the ``curriculum`` group);
    it then goes through :func:`schedule_config`, so it is validated exactly like the dataclass.
    A dataclass is validated again too (a DictConfig assignment can bypass ``__post_init__``).
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} must be an integer >= 1")
    if isinstance(cfg, ScheduleConfig):
        cfg = type(cfg)(**{k: _plain(getattr(cfg, k)) for k in cfg.field_names()})
    else:
        cfg = schedule_config(cfg)
    return cfg.build(total_steps)
