"""What every threshold schedule's configuration shares, and the checks they use (docs/method.md §3–4).

Each schedule keeps its own knobs in its own dataclass, in its own module (``MedLocConfig`` in
:mod:`.medloc`; ``FixedConfig``, ``NoThresholdConfig``, ``VTriuneConfig``, ``FixedStepConfig`` in
:mod:`.progress`), derived from :class:`ScheduleConfig`. ``medloc.curriculum.SCHEDULES`` maps a
schedule name to its dataclass; the Hydra ``curriculum`` group holds one schedule's keys and
``medloc.curriculum.schedule_config`` turns them into that dataclass.

The dataclasses double as OmegaConf schemas (the replay tool's ``key=value`` overrides, tests), so
their field types are only those OmegaConf accepts: variants are ``str`` checked in
``__post_init__`` against the ``Literal`` aliases. Defaults are the paper's values; every value the
paper does not give is marked ASSUMED with the docs/method.md section that discusses it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

from medloc.rewards import CompareOp

if TYPE_CHECKING:
    from medloc.curriculum.base import Scheduler

RefreshMode = Literal["semi", "full", "quarter", "none"]
StepPolicy = Literal["piecewise", "linear", "cosine"]
StdOver = Literal["step_means", "all_rewards"]

MIN_STEP = 1e-6  # smallest step δ that survives rounding τ to 6 decimals

__all__ = ["MIN_STEP", "CompareOp", "RefreshMode", "ScheduleConfig", "StdOver", "StepPolicy",
           "check_choice", "check_edges", "check_range"]


def check_choice(name: str, value: object, alias: object) -> None:
    allowed = get_args(alias)
    if value not in allowed:
        raise ValueError(f"curriculum.{name}={value!r} is not allowed; choose one of {allowed}")


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False,
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


def check_edges(name: str, rows: list[list[float]], width: int, tau0: float) -> None:
    """Rows ``[lower_edge, ...]`` with strictly increasing edges, the first at or below τ0."""
    if len(rows) == 0:
        raise ValueError(f"curriculum.{name} must have at least one row")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"curriculum.{name}[{i}]={list(row)!r} must have {width} numbers")
        check_range(f"{name}[{i}][0] (lower τ edge)", row[0], 0.0, 1.0)
    edges = [row[0] for row in rows]
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"curriculum.{name} lower τ edges {edges} must be strictly increasing")
    if edges[0] > tau0:
        raise ValueError(
            f"curriculum.{name} first lower τ edge {edges[0]} must be <= tau0={tau0} so every τ "
            f"the schedule reaches falls in a row"
        )


@dataclass
class ScheduleConfig:
    """The keys every schedule has; a schedule's dataclass adds its own and implements ``build``."""

    # The schedule's name: a key of medloc.curriculum.SCHEDULES (conf/curriculum/<yaml> sets it).
    schedule: str = ""
    # Comparison operator of the hit test 1[IoU op τ], in the reward and in any statistic the
    # schedule computes: ">=" as the paper writes; ">" as early VLM-R1 coded (docs/method.md §4).
    op: str = ">="

    #: False for a schedule that produces no threshold (only ``reward.kind=raw_iou`` reads none)
    has_threshold: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_choice("op", self.op, CompareOp)

    def build(self, total_steps: int) -> Scheduler:
        """The scheduler these values describe; ``total_steps`` = T of progress-based schedules."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """All field names, in declaration order (the keys its YAML may hold)."""
        return tuple(f.name for f in fields(cls))
