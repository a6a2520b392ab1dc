"""Replay a threshold schedule on recorded IoUs, without training (tune P, S and Δ offline).

    python -m medloc.curriculum.replay --trajectory FILE [key=value ...] [--plot out.png]

FILE is JSONL, one training step per line, in training order::

    {"step": 0, "ious": [0.41, 0.0, 0.77, ...]}     # IoUs of ALL samples of that step

Blank lines are skipped; ``step`` values must be strictly increasing integers. The i-th line is
fed to the scheduler as its 0-based step i (so a trajectory logged from step 1, or with gaps,
still replays), and progress-based schedules take T = the number of lines.

``key=value`` words set the schedule's config fields by name (``schedule``, then that schedule's
keys: MedLoc-R1's ``window``, ``refresh``, ``step``, ``tau0``, ``tau_target``, ``delta``,
``delta0``, ``delta_min``, ``check_reward``, ``check_stability``, ``check_margin``; ``fixed``'s
``tau``; ``op``, ...; keys of another schedule are ignored, as in the ``curriculum`` group).
Booleans are true/false; list fields take JSON, e.g. ``pass_table=[[0,0.8,0.2],[0.6,0.7,0.3]]``.

Output: one JSON line per step on stdout::

    {"step": k, "tau": τ used for step k's rewards (null for schedule=none), "raised": bool,
     "hit_rate": r̄, "std": σ, "margin": m̄}

The statistics are the MedLoc-R1 window statistics after adding step k, under the τ used at
step k — the values the raise decision saw (docs/method.md §3); null while the window is not full and
for schedules that have no window. ``--plot out.png`` also draws τ and the three statistics over
the steps. Errors (bad line, unknown key) go to stderr with exit status 2 and no output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np

from medloc.atomic import atomic_write_with
from medloc.curriculum import build_scheduler, known_keys, schedule_config
from medloc.curriculum.config import ScheduleConfig
from medloc.jsonl import JsonlError, read_jsonl
from medloc.logging import console

__all__ = ["ReplayError", "apply_overrides", "main", "plot_replay", "read_trajectory", "replay"]


class ReplayError(ValueError):
    """A user-facing error of the replay tool (bad trajectory line, bad override)."""


def read_trajectory(path: str | Path) -> list[tuple[int, np.ndarray]]:
    """Read and validate the whole trajectory file: ``[(step, ious [M]), ...]``."""
    path = Path(path)
    try:
        rows = read_jsonl(path)
    except OSError as exc:
        raise ReplayError(f"cannot read trajectory {path}: {exc}") from None
    except JsonlError as exc:  # names path:line
        raise ReplayError(str(exc)) from None
    out: list[tuple[int, np.ndarray]] = []
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or "step" not in obj or "ious" not in obj:
            raise ReplayError(f'{where}: expected an object {{"step": int, "ious": [numbers]}}')
        step, ious = obj["step"], obj["ious"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise ReplayError(f"{where}: step={step!r} must be an integer")
        if out and step <= out[-1][0]:
            raise ReplayError(f"{where}: step {step} does not follow step {out[-1][0]} (must increase)")
        if not isinstance(ious, list) or not ious:
            raise ReplayError(f"{where}: ious must be a non-empty list of numbers")
        for i, v in enumerate(ious):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                math.isfinite(v) and 0.0 <= v <= 1.0
            ):
                raise ReplayError(f"{where}: ious[{i}]={v!r} is not a number in [0, 1]")
        out.append((step, np.asarray(ious, dtype=np.float64)))
    if not out:
        raise ReplayError(f"{path}: the trajectory has no steps")
    return out


def _convert(key: str, raw: str, type_: Any) -> Any:
    if type_ is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ReplayError(f"override {key}={raw!r}: expected true or false")
    if type_ is int:
        try:
            return int(raw)
        except ValueError:
            raise ReplayError(f"override {key}={raw!r}: expected an integer") from None
    if type_ is float:
        try:
            return float(raw)
        except ValueError:
            raise ReplayError(f"override {key}={raw!r}: expected a number") from None
    if type_ is str:
        return raw
    if typing.get_origin(type_) is list:
        try:
            value = json.loads(raw)
        except ValueError:
            raise ReplayError(f"override {key}={raw!r}: expected a JSON list") from None
        if not isinstance(value, list):
            raise ReplayError(f"override {key}={raw!r}: expected a JSON list")
        return value
    raise ReplayError(f"override {key}: unsupported field type {type_!r}")  # pragma: no cover


def apply_overrides(words: list[str], base: ScheduleConfig | None = None) -> ScheduleConfig:
    """``["key=value", ...]`` -> a validated schedule config (unknown key or bad value raises).

    Starts from ``base`` (default: MedLoc-R1's defaults); ``schedule=NAME`` picks another schedule,
    whose own defaults then fill what the words do not set.
    """
    hints = known_keys()
    values: dict[str, Any] = dataclasses.asdict(base) if base is not None else {"schedule": "medloc"}
    for word in words:
        key, sep, raw = word.partition("=")
        key = key.strip()
        if not sep:
            raise ReplayError(f"override {word!r} is not key=value")
        if key not in hints:
            raise ReplayError(f"unknown override key {key!r}; allowed keys: {', '.join(hints)}")
        values[key] = _convert(key, raw, hints[key])
    try:
        return schedule_config(values)
    except ValueError as exc:
        raise ReplayError(str(exc)) from None


def replay(trajectory: list[tuple[int, np.ndarray]], cfg: ScheduleConfig) -> list[dict[str, Any]]:
    """Run the configured scheduler over the trajectory; one output row per step (see module doc)."""
    sched = build_scheduler(cfg, total_steps=len(trajectory))
    rows = []
    for i, (file_step, ious) in enumerate(trajectory):
        m = sched.observe(i, ious)
        rows.append({
            "step": file_step,
            "tau": m.get("curriculum/tau"),
            "raised": bool(m["curriculum/raised"]),
            "hit_rate": m.get("curriculum/window_hit_rate"),
            "std": m.get("curriculum/window_std"),
            "margin": m.get("curriculum/window_margin"),
        })
    return rows


def plot_replay(rows: list[dict[str, Any]], out: str | Path, title: str = "") -> None:
    """PNG of τ and the three window statistics over steps; raises marked by dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> list[float]:
        return [float("nan") if r[key] is None else float(r[key]) for r in rows]

    steps = [r["step"] for r in rows]
    raised_at = [r["step"] for r in rows if r["raised"]]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    panels = [("tau", "τ used"), ("hit_rate", "window hit rate r̄"), ("std", "window std σ"),
              ("margin", "window margin m̄")]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, series(key), drawstyle="steps-post" if key == "tau" else "default")
        ax.set_ylabel(label)
        for s in raised_at:
            ax.axvline(s, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    out = Path(out)
    try:
        atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medloc.curriculum.replay",
        description="Replay an IoU-threshold schedule on recorded per-step IoUs (docs/method.md §3-4).",
    )
    parser.add_argument("--trajectory", required=True, help='JSONL: {"step": k, "ious": [...]} per line')
    parser.add_argument("--plot", default=None, help="also write a PNG of τ and the statistics here")
    parser.add_argument("overrides", nargs="*", help="schedule config fields as key=value")
    args = parser.parse_args(argv)
    try:
        cfg = apply_overrides(args.overrides)
        rows = replay(read_trajectory(args.trajectory), cfg)
        if args.plot:
            try:
                plot_replay(rows, args.plot, title=f"schedule={cfg.schedule}")
            except OSError as exc:
                raise ReplayError(f"cannot write plot {args.plot}: {exc}") from None
    except ReplayError as exc:
        console(f"replay: error: {exc}", err=True)
        return 2
    console("".join(json.dumps(r) + "\n" for r in rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
