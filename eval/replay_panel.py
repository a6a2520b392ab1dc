"""Counterfactual replay of an ablation sweep: which decisions each check and refresh rule changes.

    python -m eval.replay_panel SWEEP_DIR --table criteria|schedule|decay|refresh [--out DIR]

In a trained ablation run, τ changes the rewards, the rewards change the model, and the model
changes the IoUs the next decision sees: two arms differ by their rule AND by training noise.
The replay removes the second part. For every (twin, model, seed) of the sweep it takes the IoUs
the full rule's trained run recorded (``ious.jsonl`` of the table's reference arm, MedLoc-R1 as
published) and feeds them, step by step, to every arm's threshold schedule (the ``curriculum`` of
its ``resolved_config.json``; ``medloc.curriculum.build_scheduler``). Same IoUs, different rule:
every difference in τ is a decision of the rule.

Writes ``<table>_replay.md`` and ``<table>_replay.csv`` into ``--out`` (default: SWEEP_DIR) and
``plots/<table>_replay.png`` there: per (twin, model, seed), τ over the steps of each arm, replayed
(left) and in the trained runs (right). Per arm and seed the table gives the number of raises,
the step of the first decision that differs from the full rule's (a raise where it held, a hold
where it raised, or a raise to another τ) and the final τ, for the replay and for the trained run.
Arms without a threshold (SFT, Raw-IoU) have nothing to replay and are left out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.runs import Run, discover_runs
from eval.table_spec import ABLATION_TABLES, ablation_rows
from eval.tau_paths import TauPath, first_difference, replay_path, trained_path
from medloc.atomic import atomic_write_files, atomic_write_with
from medloc.curriculum import schedule_config
from medloc.curriculum.config import ScheduleConfig
from medloc.curriculum.replay import ReplayError, read_trajectory
from medloc.logging import console

__all__ = ["PanelRow", "build_panel", "main", "plot_panel", "render_csv", "render_markdown"]


@dataclass(frozen=True)
class PanelRow:
    """One arm on one (dataset, model, seed): its replayed and its trained τ path."""

    dataset: str
    model: str
    seed: int
    label: str
    arm: str
    replayed: TauPath
    replay_differs_at: int | None  # first decision that differs from the full rule's (replay)
    trained: TauPath | None
    trained_differs_at: int | None  # same, trained run vs the full rule's trained run


def _schedule_of(run: Run) -> ScheduleConfig | None:
    """The run's schedule config (``resolved_config.json``); None when it has no threshold."""
    path = run.path / "resolved_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))["curriculum"]
        schedule = schedule_config(cfg)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read the run's curriculum ({err})") from None
    return schedule if type(schedule).has_threshold else None


def build_panel(sweep_dir: str | Path, table: str) -> tuple[list[PanelRow], list[str]]:
    """Replay every arm of ``table`` on each full-rule trajectory of the sweep; rows and notes."""
    rows_spec = ablation_rows(table)
    reference_arm = rows_spec[0][1]
    sweep = discover_runs(sweep_dir)
    notes = list(sweep.notes)
    rows: list[PanelRow] = []
    cells = sorted({(r.dataset, r.model) for r in sweep.runs})
    for dataset, model in cells:
        configs: dict[str, ScheduleConfig] = {}
        for _, arm in rows_spec:
            runs = sweep.select(dataset, model, arm)
            if runs and (cfg := _schedule_of(runs[0])) is not None:
                configs[arm] = cfg
        for ref in sweep.select(dataset, model, reference_arm):
            ious = ref.path / "ious.jsonl"
            if not ious.is_file():
                notes.append(f"{ref.path}: no ious.jsonl; seed {ref.seed} not replayed")
                continue
            try:
                trajectory = read_trajectory(ious)
            except ReplayError as err:
                notes.append(f"{err}; seed {ref.seed} not replayed")
                continue
            reference = replay_path(trajectory, configs[reference_arm])
            ref_trained = trained_path(ref.path)
            for label, arm in rows_spec:
                if arm not in configs:
                    continue
                replayed = replay_path(trajectory, configs[arm])
                own = [r for r in sweep.select(dataset, model, arm) if r.seed == ref.seed]
                trained = trained_path(own[0].path) if own else None
                rows.append(PanelRow(
                    dataset, model, ref.seed, label, arm, replayed,
                    first_difference(replayed, reference), trained,
                    first_difference(trained, ref_trained) if trained and ref_trained else None))
    return rows, notes


def _differs(step: int | None, is_reference: bool) -> str:
    if is_reference:
        return "(reference)"
    return "same as the full rule" if step is None else f"step {step}"


def _final(path: TauPath | None) -> str:
    if path is None:
        return "—"
    return "?" if path.final_tau is None else f"{path.final_tau:g}"


def render_markdown(rows: Sequence[PanelRow], table: str, notes: Sequence[str]) -> str:
    reference_arm = ablation_rows(table)[0][1]
    intro = ("Each arm's schedule replayed on the IoUs that the full rule's trained run recorded "
             "(same twin, model, seed): decisions only, no training. The trained columns are the "
             "arm's own run. 'first difference' = the step of the first decision (raise or hold, "
             "and the τ raised to) that differs from the full rule's, taken after that step. "
             "τ path: τ0, then →new τ@the first step trained at it (the step after the decision).")
    out = [f"## Counterfactual replay: {table}", "", intro, ""]
    blocks = sorted({(r.dataset, r.model, r.seed) for r in rows})
    for dataset, model, seed in blocks:
        out += [f"### {dataset} · {model} · seed {seed}", "",
                ("| Arm | raises (replay) | first difference (replay) | final τ (replay) "
                 "| τ path (replay) | raises (trained) | first difference (trained) "
                 "| τ path (trained) |"),
                "|---|---:|---|---:|---|---:|---|---|"]
        for r in rows:
            if (r.dataset, r.model, r.seed) != (dataset, model, seed):
                continue
            ref = r.arm == reference_arm
            out.append(
                f"| {r.label} | {r.replayed.n_raises} | {_differs(r.replay_differs_at, ref)} "
                f"| {_final(r.replayed)} | {r.replayed.describe()} "
                f"| {r.trained.n_raises if r.trained else '—'} "
                f"| {_differs(r.trained_differs_at, ref) if r.trained else '—'} "
                f"| {r.trained.describe() if r.trained else '—'} |")
        out.append("")
    if notes:
        out += ["Notes:", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def render_csv(rows: Sequence[PanelRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "model", "seed", "arm", "label", "replay_raises",
                "replay_first_difference", "replay_final_tau", "replay_path", "trained_raises",
                "trained_first_difference", "trained_path"])
    for r in rows:
        w.writerow([r.dataset, r.model, r.seed, r.arm, r.label, r.replayed.n_raises,
                    "" if r.replay_differs_at is None else r.replay_differs_at,
                    _final(r.replayed), r.replayed.describe(),
                    "" if r.trained is None else r.trained.n_raises,
                    "" if r.trained_differs_at is None else r.trained_differs_at,
                    "" if r.trained is None else r.trained.describe()])
    return buf.getvalue()


def plot_panel(rows: Sequence[PanelRow], out: Path, title: str) -> Path:
    """One PNG: a line of two panels per (dataset, model, seed), replayed and trained τ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.style import arm_style, legend_outside

    blocks = sorted({(r.dataset, r.model, r.seed) for r in rows})
    fig, axes = plt.subplots(len(blocks), 2, figsize=(12, 3.2 * len(blocks)), squeeze=False,
                             sharey=True)
    for (dataset, model, seed), (left, right) in zip(blocks, axes):
        block = [r for r in rows if (r.dataset, r.model, r.seed) == (dataset, model, seed)]
        for i, r in enumerate(block):
            # τ of step s drawn from s to s+1 (steps-post): a raise decided after step s shows at
            # s+1, the step the tables' "→τ@step" names (eval.tau_paths.TauPath.describe).
            style = {"linewidth": 2.6 if i == 0 else 1.4, "alpha": 0.9,
                     "drawstyle": "steps-post", "label": r.label, **arm_style(r.arm)}
            left.plot(r.replayed.steps, r.replayed.taus, **style)
            if r.trained is not None:
                right.plot(r.trained.steps, r.trained.taus, **style)
        left.set_title(f"{dataset} · {model} · seed {seed}: replayed on the full rule's IoUs",
                       fontsize=9)
        right.set_title(f"{dataset} · {model} · seed {seed}: each arm's trained run", fontsize=9)
        left.set_ylabel("IoU threshold τ")
        for ax in (left, right):
            ax.grid(alpha=0.3)
    legend_outside(axes[0][1])
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90,
                                                      bbox_inches="tight"))
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.replay_panel", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--table", choices=ABLATION_TABLES, required=True)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    args = parser.parse_args(argv)
    try:
        rows, notes = build_panel(args.sweep_dir, args.table)
    except (FileNotFoundError, ValueError) as err:
        console(f"error: {err}", err=True)
        return 1
    if not rows:
        console(f"error: no run of the full rule ({ablation_rows(args.table)[0][1]}) with an "
                f"ious.jsonl under {args.sweep_dir}: nothing to replay", err=True)
        return 1
    out_dir = args.out if args.out is not None else args.sweep_dir
    md = render_markdown(rows, args.table, notes)
    files = {out_dir / f"{args.table}_replay.md": md,
             out_dir / f"{args.table}_replay.csv": render_csv(rows)}
    # the plot first (the step most likely to fail), then the two tables together
    png = plot_panel(rows, out_dir / "plots" / f"{args.table}_replay.png",
                     f"{args.table} ablation: the IoU threshold τ of each arm, replayed and trained")
    atomic_write_files(files)
    console(md)
    console(f"wrote {', '.join(str(p) for p in [*files, png])}", err=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
