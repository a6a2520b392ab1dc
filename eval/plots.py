"""Plots of a sweep (PAPER.md §5): training curves per method and Acc@t curves over t.

Uses matplotlib's non-interactive Agg backend; every function writes one PNG (atomically) and
returns its path. Nothing here computes a metric: training curves come from each run's
``metrics.jsonl`` (one JSON object per training step with ``"step"`` and slash-namespaced keys,
e.g. ``curriculum/tau``, ``reward/dead_group_frac``), Acc@t values from ``medloc.metrics``.
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
from medloc.atomic import atomic_write_with


def _run_label(run_dir: Path) -> str:
    """The run's ``arm`` from ``run_info.json``; the folder name if there is none."""
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
    for label in sorted(groups):
        runs = groups[label]
        steps = np.array(sorted(set().union(*runs)))
        mean = np.array([np.mean([r[s] for r in runs if s in r]) for s in steps])
        ax.plot(steps, moving_average(mean, smooth), label=f"{label} (n={len(runs)})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key + (f" (moving average of {smooth})" if smooth > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_atomic(fig, out_png)


def plot_acc_curves(
    metrics_by_method: Mapping[str, Mapping[float | str, float]],
    out_png: str | Path,
    *,
    title: str = "Acc@t over IoU threshold t",
) -> Path:
    """One line per method: Acc@t (percent) against t.

    ``metrics_by_method`` maps a method label to ``{t: acc}``; ``t`` may be a float or a string
    such as ``"0.50"`` (the ``acc_by_threshold`` field of ``medloc.metrics.score_predictions``).
    """
    if not metrics_by_method:
        raise ValueError("metrics_by_method is empty: nothing to plot")
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for label, curve in metrics_by_method.items():
        if not curve:
            raise ValueError(f"method {label!r} has no Acc@t values")
        points = sorted((float(t), float(v)) for t, v in curve.items())
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xlabel("IoU threshold t")
    ax.set_ylabel("Acc@t (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_atomic(fig, out_png)
