"""How the plots name and draw things: human labels for metric keys, the tables' names for arms,
and one fixed colour and line style per arm, the same in every figure of every sweep.

- ``metric_label(key)``: ``"curriculum/tau"`` -> ``"IoU threshold τ"``; an unknown key is
  returned as it is.
- ``arm_label(arm)``: the name the tables print (``eval.paper_numbers.ARM_LABELS``, then the
  ablation tables' row names, e.g. ``no_margin_check`` -> ``"w/o IoU-margin check"``); an unknown
  arm keeps its config name.
- ``arm_style(arm)``: ``{"color", "linestyle"}`` from ``ARM_ORDER``: the paper's methods and
  baselines solid, the ablation variants dashed, each with its own colour of ``PALETTE`` (22
  colours, so the 13 arms of the ablations sweep and Table 1's arms never share one). An arm not
  in ``ARM_ORDER`` gets a colour and a dotted/dash-dot style from its name (stable across runs).
- ``legend_outside(ax)``: the legend to the right of the axes, never over the data.
- ``fitted_upper(values)``: a y-axis top for percentages that fits the data (e.g. 16 -> 20).
- ``seeds_note(counts)``: "mean over n seeds" only when every curve has n > 1 seeds.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from eval.paper_numbers import ARM_LABELS

METRIC_LABELS: dict[str, str] = {
    "curriculum/tau": "IoU threshold τ",
    "curriculum/window_hit_rate": "window hit rate at τ",
    "curriculum/window_margin": "window mean IoU − τ",
    "curriculum/window_std": "window IoU std",
    "curriculum/raises": "τ raises so far",
    "reward/mean": "mean reward",
    "reward/accuracy": "accuracy reward",
    "reward/format": "format reward",
    "iou/mean": "mean sampled IoU",
    "reward/dead_group_frac": "dead-group fraction (all G rewards equal)",
    "loss/total": "loss",
    "loss/policy": "policy loss",
    "loss/kl": "KL to the reference",
    "loss/sft": "SFT loss",
    "acc@0.5": "Acc@0.5 (%)",
    "acc@0.75": "Acc@0.75 (%)",
    "acc@0.8": "Acc@0.8 (%)",
    "pseudo_map": "pseudo-mAP (%)",
    "mean_iou": "mean IoU",
}

ARM_ORDER: tuple[str, ...] = (
    # the paper's methods and baselines (solid)
    "medloc", "sft", "vlm_r1", "v_triune", "raw_iou", "zero_shot", "v_triune_medloc_range",
    "fixed_conservative", "fixed_moderate", "fixed_aggressive",
    # MedLoc-R1's ablation variants and this repository's additions (dashed)
    "no_reward_check", "no_margin_check", "no_stability_check", "reward_check_only",
    "medloc_linear", "medloc_cosine", "refresh_full", "refresh_quarter", "refresh_none",
    "medloc_calibrated", "medloc_hybrid", "medloc_band",
)
"""Each arm's fixed place in ``PALETTE``: never reorder, only append (colours would change)."""

PALETTE: tuple[str, ...] = (
    # matplotlib's tab10
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    # ten more, dark or saturated enough for thin lines on white, none close to the ten above
    "#000075", "#800000", "#808000", "#00a087", "#4b0082",
    "#f032e6", "#000000", "#e6a700", "#3cb44b", "#fa8072",
    "#2f4f4f", "#c71585",
)

_SOLID_UNTIL = ARM_ORDER.index("no_reward_check")


def metric_label(key: str) -> str:
    """Human label of a metric key (axis labels, titles); the key itself when unknown."""
    return METRIC_LABELS.get(key, key)


def _ablation_labels() -> dict[str, str]:
    from eval import table_spec

    out: dict[str, str] = {}
    for table in table_spec.ABLATION_TABLES:
        for label, arm in table_spec.ablation_rows(table):
            # "Linear" or "Full (drop all)" alone do not say what varies: the table's name does
            out.setdefault(arm, f"{table.capitalize()}: {label}" if table in ("decay", "refresh")
                           else label)
    for label, arm in getattr(table_spec, "BEYOND_ROWS", ()):  # beyond-the-paper arms, if any
        out.setdefault(arm, label)
    return out


def arm_label(arm: str) -> str:
    """The name the tables print for ``arm`` (the config name when no table names it)."""
    if arm in ARM_LABELS:
        return ARM_LABELS[arm]
    return _ablation_labels().get(arm, arm)


def arm_style(arm: str) -> dict[str, Any]:
    """``{"color", "linestyle"}`` of ``arm``: the same in every figure (module doc)."""
    if arm in ARM_ORDER:
        i = ARM_ORDER.index(arm)
        return {"color": PALETTE[i % len(PALETTE)], "linestyle": "-" if i < _SOLID_UNTIL else "--"}
    h = zlib.crc32(arm.encode("utf-8"))  # stable across processes (str hash is salted)
    return {"color": PALETTE[h % len(PALETTE)], "linestyle": (":", "-.")[(h // len(PALETTE)) % 2]}


def legend_outside(ax: Any, **kwargs: Any) -> Any:
    """The legend to the right of ``ax`` (outside the data); the figure is saved with
    ``bbox_inches="tight"`` so it is kept whole."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                     fontsize="small", frameon=False, **kwargs)


def fitted_upper(values: Iterable[float], *, step: float = 5.0, cap: float = 100.0) -> float:
    """Top of a percentage axis that fits ``values``: their maximum plus 10 %, rounded up to a
    multiple of ``step``, at least ``step``, at most ``cap`` (16 -> 20, 94 -> 100, 0 -> 5)."""
    top = max([0.0, *values])
    return float(min(cap, max(step, math.ceil(top * 1.1 / step) * step)))


def seeds_note(counts: Mapping[str, int]) -> str:
    """``"mean over 3 seeds"`` when every curve has the same n > 1, ``"mean over 2-3 seeds"`` when
    they differ (all > 1), ``"n = 1 seed"`` when every one has one, else ``"n per curve in the
    legend"``."""
    ns = sorted(set(counts.values()))
    if not ns:
        return ""
    if ns == [1]:
        return "n = 1 seed"
    if ns[0] > 1:
        return f"mean over {ns[0]} seeds" if len(ns) == 1 else f"mean over {ns[0]}-{ns[-1]} seeds"
    return "mean over the seeds where n > 1 (n in the legend)"
