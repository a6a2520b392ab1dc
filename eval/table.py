"""Build the paper's tables from a sweep's run folders (docs/method.md §5, §6).

Usage::

    python -m eval.table SWEEP_DIR [--out DIR]
        [--table table1|scale|criteria|schedule|decay|refresh|beyond|all]

A *run folder* is any folder under SWEEP_DIR (searched recursively) that holds

- ``run_info.json``: ``{"dataset": str, "arm": str, "seed": int, "model": str}`` (``arm`` is the
  name of the ``conf/arm/<arm>.yaml`` the run was made with: one row of a results table; the arms
  of the paper's tables are listed in ``eval.paper_numbers``), and
- ``eval/metrics.json``: the output of ``medloc.metrics.score_predictions``; and optionally
- ``eval/predictions.jsonl``: one line per test sample with at least ``"id"`` and ``"iou"``
  (``null`` = miss), used for the per-image sign-flip test.

Runs are grouped into *cells* by (dataset, model, arm); a cell's seeds are aggregated
as mean ± sample std (ddof = 1; no std with one seed). Every row is compared with the reference
row of its table (MedLoc-R1 as published): a paired t-test over the seeds both have, and, for Acc@t
metrics, an exact sign-flip test over test images that keeps each image's seeds together
(``eval.significance.sign_flip_test``; with one seed it is the exact McNemar test).

Writes ``<table>.md``, ``<table>.tex`` (booktabs) and ``<table>.csv`` into ``--out`` (default:
SWEEP_DIR) and prints the Markdown. Missing cells print as "—"; incomplete or unreadable run
folders are listed under "Notes", never fatal. The paper's number stands in brackets beside ours.
A dataset named ``phantom_X`` is matched to the paper's ``X`` for those bracketed numbers.
``beyond`` (docs/beyond.md) also gets its training side below the Markdown table and in
``beyond_training.csv``: per arm, the mean dead-group fraction over the steps, the raises and the
final τ of each seed (from each run's ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import get_args

from eval.render import render_csv, render_latex, render_markdown
from eval.runs import Sweep, discover_runs
from eval.table_spec import Table, TableName, TrainingRow, build_table, training_summary

PAPER_TABLES = tuple(t for t in get_args(TableName) if t != "beyond")
"""``--table all``: the paper's tables; ``beyond`` (docs/beyond.md) is built from its own sweep."""
from medloc.atomic import atomic_write_files
from medloc.logging import console

__all__ = ["Sweep", "Table", "build_table", "discover_runs", "main", "render_csv", "render_latex",
           "render_markdown", "write_table"]


def _mean_std(values: tuple[float, ...], fmt: str) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return format(mean, fmt)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def render_training_markdown(rows: list[TrainingRow]) -> str:
    """The training side of a table: dead-group fraction, raises, final τ (mean ± std; per seed)."""
    lines = ["### Training: dead-group fraction (mean over steps), raises, final τ", "",
             "Mean ± std over seeds; per seed in brackets, in seed order.", "",
             "| Dataset | Arm | dead-group fraction | raises | final τ | seeds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        per = lambda vs, f: "[" + " / ".join(format(v, f) for v in vs) + "]"
        lines.append(f"| {r.dataset}{' (' + r.model + ')' if r.model else ''} | {r.label} | "
                     f"{_mean_std(r.dead_group_frac, '.2f')} {per(r.dead_group_frac, '.2f')} | "
                     f"{_mean_std(tuple(float(x) for x in r.raises), '.1f')} {per(r.raises, 'd')} | "
                     f"{_mean_std(r.final_tau, '.3f')} | {len(r.seeds)} |")
    return "\n".join(lines) + "\n"


def render_training_csv(rows: list[TrainingRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "model", "row", "arm", "seed", "dead_group_frac", "raises", "final_tau"])
    for r in rows:
        for i, seed in enumerate(r.seeds):
            w.writerow([r.dataset, r.model, r.label, r.arm, seed, f"{r.dead_group_frac[i]:.6f}",
                        r.raises[i], f"{r.final_tau[i]:.6g}"])
    return buf.getvalue()


def write_table(table: Table, out_dir: str | Path,
                training: list[TrainingRow] | None = None) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.tex``, ``<name>.csv`` into ``out_dir``; return the paths.
    With ``training`` rows, the Markdown ends with them and ``<name>_training.csv`` holds them."""
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")}
    md = render_markdown(table)
    files = {paths["tex"]: render_latex(table), paths["csv"]: render_csv(table)}
    if training is not None:
        md = md.rstrip("\n") + "\n\n" + render_training_markdown(training)
        paths["training_csv"] = out_dir / f"{table.name}_training.csv"
        files[paths["training_csv"]] = render_training_csv(training)
    files[paths["md"]] = md
    atomic_write_files(files)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.table",
                                     description="Build the paper's tables from a sweep folder.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    parser.add_argument("--table", choices=[*get_args(TableName), "all"], default="table1",
                        help="all: the paper's tables (every one but beyond)")
    args = parser.parse_args(argv)
    try:
        sweep = discover_runs(args.sweep_dir)
    except FileNotFoundError as err:
        console(f"error: {err}", err=True)
        return 1
    names = PAPER_TABLES if args.table == "all" else (args.table,)
    out_dir = args.out if args.out is not None else args.sweep_dir
    console(f"{len(sweep.runs)} evaluated run(s) under {args.sweep_dir}", err=True)
    for note in sweep.notes:
        console(f"note: {note}", err=True)
    for name in names:
        table = build_table(sweep, name)
        if not table.entries:  # beyond has no paper numbers to show in an empty layout
            console(f"error: {args.sweep_dir} has no evaluated run of the {name} table's arms",
                    err=True)
            return 1
        training = training_summary(sweep) if name == "beyond" else None
        paths = write_table(table, out_dir, training)
        console(render_markdown(table))
        if training is not None:
            console(render_training_markdown(training))
        console(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
