"""Plots of a finished sweep, per dataset: dead-group fraction and τ over steps, Acc@t curves; and
the sweep's mechanism tables (``eval.mechanism``: reward sparsity at the start, dead groups and τ
raises during training) as ``mechanism.md/.tex/.csv`` beside the sweep's tables.

    python -m experiments.plots runs/table1_embedded      # -> runs/table1_embedded/plots/*.png
    python -m experiments.plots runs/table1_embedded --out /tmp/report   # -> /tmp/report/plots/

Curves are means over seeds (``eval.plots``; a title says "mean over n seeds" only when n > 1,
and each legend entry gives its n); arms carry the tables' names and their fixed colours
(``eval.style``). Nothing is computed here that ``eval`` does not own.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from eval.plots import plot_acc_curves, plot_curves
from eval.style import metric_label
from medloc.logging import console


def run_dirs_by_dataset(sweep_dir: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    for info in sorted(sweep_dir.rglob("run_info.json")):
        out[json.loads(info.read_text())["dataset"]].append(info.parent)
    return out


def acc_by_arm(runs: list[Path]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Arm (run_info.json) -> {t: mean Acc@t over the seeds that have eval/metrics.json}, and
    arm -> how many seeds that mean is over."""
    acc: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in runs:
        m = run / "eval" / "metrics.json"
        if not m.is_file():
            continue
        info = json.loads((run / "run_info.json").read_text())
        label = info.get("arm") or run.name
        acc[label].append(json.loads(m.read_text())["acc_by_threshold"])
    means = {k: {t: float(np.mean([v[t] for v in vs])) for t in vs[0]} for k, vs in acc.items()}
    return means, {k: len(vs) for k, vs in acc.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m experiments.plots", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for plots/ and mechanism.* (default: the sweep folder)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    sweep = args.sweep_dir
    if not sweep.is_dir():
        console(f"error: sweep folder {sweep} does not exist", err=True)
        return 2
    root = args.out if args.out is not None else sweep
    out = root / "plots"
    written = []
    for dataset, runs in sorted(run_dirs_by_dataset(sweep).items()):
        trained = [r for r in runs if (r / "metrics.jsonl").is_file()]
        for key, name, smooth in [
            ("reward/dead_group_frac", "dead_groups", 5),
            ("curriculum/tau", "tau", 1),
            ("loss/kl", "kl", 5),
        ]:
            try:
                written.append(plot_curves(trained, key, out / f"{dataset}_{name}.png", smooth=smooth,
                                           title=f"{dataset}: {metric_label(key)}"))
            except ValueError:
                pass  # no run of this dataset logged the key (e.g. an SFT-only sweep)
        acc, n_seeds = acc_by_arm(runs)
        if acc:
            written.append(plot_acc_curves(acc, out / f"{dataset}_acc_curves.png",
                                           title=f"{dataset}: Acc@t on the test split",
                                           n_seeds=n_seeds))
    from eval.mechanism import write_mechanism

    written += list(write_mechanism(sweep, root).values())
    for path in written:
        console(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
