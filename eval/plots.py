"""Plots of a sweep (docs/method.md §5): training curves per method and Acc@t curves over t.

Uses matplotlib's non-interactive Agg backend; every function writes one PNG (atomically) and
returns its path. Nothing here computes a metric: training curves come from each run's
``metrics.jsonl`` (one JSON object per training step with ``"step"`` and slash-namespaced keys,
e.g. ``curriculum/tau``, ``reward/dead_group_frac``), Acc@t values from ``medloc.metrics``.

How things are named and drawn (``eval.style``): titles and axes in words, arms by the names the
tables print, one fixed colour and line style per arm in every figure, the legend outside the
axes, a percentage axis fitted to the data, and the number of seeds as it is ("mean over n
seeds" only when n > 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt
import numpy as np

from eval.runs import read_metrics_jsonl
from eval.style import arm_label, arm_style, fitted_upper, legend_outside, metric_label, seeds_note
from medloc.atomic import atomic_write_with


def _run_label(run_dir: Path) -> str:
    """The run's ``arm`` (config name) from ``run_info.json``; the folder name if there is none."""
    info_path = run_dir / "run_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        return str(info.get("arm") or run_dir.name)
    return run_dir.name


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over the last ``window`` points (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window={window}; expected >= 1")
    if window == 1 or values.size == 0:
        return values.astype(np.float64)
    csum = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _save_atomic(fig: plt.Figure, out_png: str | Path) -> Path:
    """``fig`` as a PNG at ``out_png`` (written atomically), then closed."""
    out = Path(out_png)
    try:
        atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                      bbox_inches="tight"))
    finally:
        plt.close(fig)
    return out


def plot_curves(
    run_dirs: Sequence[str | Path],
    key: str,
    out_png: str | Path,
    *,
    smooth: int = 1,
    title: str | None = None,
) -> Path:
    """One line per arm: ``key`` over training steps, mean over the arm's runs (seeds).

    Runs are grouped by the ``arm`` of their ``run_info.json`` (folder name if absent). At each step the mean is over the runs that logged that step; the curve is then
    smoothed with a trailing moving average of ``smooth`` steps (1 = raw). Raises ValueError if
    no run logged ``key``.
    """
    groups: dict[str, list[dict[int, float]]] = {}
    for run_dir in map(Path, run_dirs):
        series = read_metrics_jsonl(run_dir / "metrics.jsonl", key)
        if series:
            groups.setdefault(_run_label(run_dir), []).append(series)
    if not groups:
        raise ValueError(f"no run under {[str(d) for d in run_dirs]} logged {key!r}")

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for arm in sorted(groups, key=_arm_order):
        runs = groups[arm]
        steps = np.array(sorted(set().union(*runs)))
        mean = np.array([np.mean([r[s] for r in runs if s in r]) for s in steps])
        # τ of step s holds until s + 1 (steps-post): a raise shows at the first step trained at
        # the new τ, the step the tables' "→τ@s" names
        steps_post = {"drawstyle": "steps-post"} if key == "curriculum/tau" else {}
        ax.plot(steps, moving_average(mean, smooth), label=f"{arm_label(arm)} (n = {len(runs)})",
                **arm_style(arm), **steps_post)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric_label(key))
    note = seeds_note({arm: len(runs) for arm, runs in groups.items()})
    smoothing = f"moving average of {smooth} steps" if smooth > 1 else ""
    detail = ", ".join(x for x in (note, smoothing) if x)
    ax.set_title((title or metric_label(key)) + (f"\n{detail}" if detail else ""), fontsize=10)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return _save_atomic(fig, out_png)


def _arm_order(arm: str) -> tuple[int, str]:
    """Legend order: the fixed arm order of ``eval.style`` (the full rule first), then by name."""
    from eval.style import ARM_ORDER

    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


def plot_acc_curves(
    metrics_by_method: Mapping[str, Mapping[float | str, float]],
    out_png: str | Path,
    *,
    title: str = "Acc@t over the IoU threshold t",
    n_seeds: Mapping[str, int] | None = None,
) -> Path:
    """One line per arm: Acc@t (percent) against t.

    ``metrics_by_method`` maps an arm (config name; drawn with the tables' name and its fixed
    style) to ``{t: acc}``; ``t`` may be a float or a string such as ``"0.50"`` (the
    ``acc_by_threshold`` field of ``medloc.metrics.score_predictions``). ``n_seeds``: how many
    seeds each curve averages (shown in the legend and the title). The y-axis is fitted to the
    data (``eval.style.fitted_upper``).
    """
    if not metrics_by_method:
        raise ValueError("metrics_by_method is empty: nothing to plot")
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    tops: list[float] = []
    for arm in sorted(metrics_by_method, key=_arm_order):
        curve = metrics_by_method[arm]
        if not curve:
            raise ValueError(f"method {arm!r} has no Acc@t values")
        points = sorted((float(t), float(v)) for t, v in curve.items())
        tops += [v for _, v in points]
        n = f" (n = {n_seeds[arm]})" if n_seeds and arm in n_seeds else ""
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", markersize=3,
                label=arm_label(arm) + n, **arm_style(arm))
    ax.set_xlabel("IoU threshold t")
    ax.set_ylabel("Acc@t (%)")
    ax.set_ylim(0, fitted_upper(tops))
    note = seeds_note(n_seeds) if n_seeds else ""
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return _save_atomic(fig, out_png)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The training curves of ONE run (τ, mean reward, dead-group fraction, KL) as one PNG,
    ``<run>/plots/training.png`` (or ``out_dir``); [] when the run logged none of them."""
    run = Path(run_dir)
    panels = [(k, read_metrics_jsonl(run / "metrics.jsonl", k)) for k in
              ("curriculum/tau", "reward/mean", "reward/dead_group_frac", "loss/kl")]
    panels = [(k, v) for k, v in panels if v]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    arm = _run_arm(run)
    for ax, (key, series) in zip(axes[0], panels):
        steps = sorted(series)
        kw = {"drawstyle": "steps-post"} if key == "curriculum/tau" else {}
        style = arm_style(arm) if arm else {"color": "#1f77b4", "linestyle": "-"}
        ax.plot(steps, [series[s] for s in steps], **style, **kw)
        ax.set_title(metric_label(key), fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{arm_label(arm) + ': ' if arm else ''}{run} (one run)", fontsize=10)
    fig.tight_layout()
    out = Path(out_dir) if out_dir is not None else run / "plots"
    return [_save_atomic(fig, out / "training.png")]


def _run_arm(run_dir: Path) -> str:
    """The run's arm (config name), "" when it has none (a run composed without arm=...)."""
    info_path = run_dir / "run_info.json"
    if not info_path.is_file():
        return ""
    return str(json.loads(info_path.read_text(encoding="utf-8")).get("arm") or "")
