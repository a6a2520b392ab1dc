"""Build the paper's tables from a sweep's run folders (PAPER.md §5, §6).

Usage::

    python -m eval.table SWEEP_DIR [--out DIR]
        [--table table1|scale|criteria|schedule|decay|refresh|all]

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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from eval.render import render_csv, render_latex, render_markdown
from eval.runs import Sweep, discover_runs
from eval.table_spec import Table, TableName, build_table
from medloc.atomic import atomic_write_files
from medloc.logging import console

__all__ = ["Sweep", "Table", "build_table", "discover_runs", "main", "render_csv", "render_latex",
           "render_markdown", "write_table"]


def write_table(table: Table, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.tex``, ``<name>.csv`` into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")}
    atomic_write_files({paths["md"]: render_markdown(table), paths["tex"]: render_latex(table),
                        paths["csv"]: render_csv(table)})
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.table",
                                     description="Build the paper's tables from a sweep folder.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    parser.add_argument("--table", choices=[*get_args(TableName), "all"], default="table1")
    args = parser.parse_args(argv)
    try:
        sweep = discover_runs(args.sweep_dir)
    except FileNotFoundError as err:
        console(f"error: {err}", err=True)
        return 1
    names = get_args(TableName) if args.table == "all" else (args.table,)
    out_dir = args.out if args.out is not None else args.sweep_dir
    console(f"{len(sweep.runs)} evaluated run(s) under {args.sweep_dir}", err=True)
    for note in sweep.notes:
        console(f"note: {note}", err=True)
    for name in names:
        table = build_table(sweep, name)
        paths = write_table(table, out_dir)
        console(render_markdown(table))
        console(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
