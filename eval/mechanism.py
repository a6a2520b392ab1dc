"""The mechanism tables of a sweep: how sparse a binary reward is at the start, and what each arm's
training did with it (dead groups, τ raises), from the sweep's own JSON files.

    python -m eval.mechanism SWEEP_DIR [--out DIR]

Writes ``mechanism.md``, ``mechanism.tex`` and ``mechanism.csv`` into ``--out`` (default:
SWEEP_DIR; ``python -m experiments.plots SWEEP_DIR``, which every sweep runs, writes them too):

1. **Reward sparsity at the start** (one row per twin, from ``SWEEP_DIR/sparsity_<dataset>.json``,
   written by ``experiments.sparsity`` before an embedded Table 1 sweep): the fraction of prompts
   whose G sampled answers all miss IoU >= τ (a binary reward at τ gives them no gradient), per τ,
   and the mean sampled IoU. Left out when the sweep has no such file.
2. **During training** (one row per twin and arm, from each run's ``metrics.jsonl``): the dead-group
   fraction (``reward/dead_group_frac``: groups whose G rewards are all equal) averaged over the
   steps, per seed in seed order; the number of τ raises per seed; and the τ path of each seed
   (``eval.tau_paths``: τ0, then →τ@the first step trained at the new τ). Arms without a threshold
   show "—" for raises and path.

Nothing here is computed that the runs did not log; each value is printed at the precision shown
(CSV included).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from eval.runs import discover_runs, read_metrics_jsonl
from eval.style import ARM_ORDER, arm_label
from eval.tau_paths import trained_path
from medloc.atomic import atomic_write_files
from medloc.logging import console

__all__ = ["SparsityRow", "TrainingRow", "main", "render", "sparsity_rows", "training_rows"]


@dataclass(frozen=True)
class SparsityRow:
    dataset: str
    prompts: int
    G: int
    all_zero: dict[str, float]  # τ ("0.10") -> fraction of groups with no hit
    mean_iou: float


@dataclass(frozen=True)
class TrainingRow:
    dataset: str
    model: str
    arm: str
    seeds: tuple[int, ...]
    dead: tuple[float | None, ...]  # mean dead-group fraction over the steps, per seed
    raises: tuple[int | None, ...]  # None: the arm has no threshold
    paths: tuple[str | None, ...]


def sparsity_rows(sweep_dir: str | Path) -> list[SparsityRow]:
    """One row per ``sparsity_<dataset>.json`` in ``sweep_dir`` (a malformed one raises naming it)."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("sparsity_*.json")):
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            rows.append(SparsityRow(
                str(d["dataset"]), int(d["prompts"]), int(d["G"]),
                {t: float(v["all_zero_frac"]) for t, v in sorted(d["by_threshold"].items())},
                float(d["mean_sampled_iou"])))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a sparsity probe result ({err!r})") from None
    return rows


def training_rows(sweep_dir: str | Path) -> tuple[list[TrainingRow], list[str]]:
    """One row per (dataset, model, arm) of the sweep's evaluated runs; and the notes of runs
    that could not be read."""
    sweep = discover_runs(sweep_dir)
    notes = list(sweep.notes)
    cells = sorted({r.cell for r in sweep.runs},
                   key=lambda c: (c[0], c[1], ARM_ORDER.index(c[2]) if c[2] in ARM_ORDER
                                  else len(ARM_ORDER), c[2]))
    rows = []
    for dataset, model, arm in cells:
        runs = sweep.select(dataset, model, arm)
        dead, raises, paths = [], [], []
        for run in runs:
            log = run.path / "metrics.jsonl"
            series = read_metrics_jsonl(log, "reward/dead_group_frac") if log.is_file() else {}
            dead.append(sum(series.values()) / len(series) if series else None)
            path = trained_path(run.path)
            raises.append(path.n_raises if path is not None else None)
            paths.append(path.describe() if path is not None else None)
        rows.append(TrainingRow(dataset, model, arm, tuple(r.seed for r in runs), tuple(dead),
                                tuple(raises), tuple(paths)))
    return rows, notes


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _per_seed(values: tuple, fmt: str) -> str:
    if all(v is None for v in values):
        return "—"
    return " / ".join("—" if v is None else format(v, fmt) for v in values)


def render(sparsity: list[SparsityRow], training: list[TrainingRow],
           notes: list[str]) -> dict[str, str]:
    """``{"md", "tex", "csv"}`` texts of the two tables (module doc)."""
    md: list[str] = ["# The mechanism: reward sparsity and what training did with it", ""]
    tex: list[str] = []
    rows_csv: list[list[str]] = [["table", "dataset", "model", "arm", "seed", "key", "value"]]
    if sparsity:
        taus = sorted({t for r in sparsity for t in r.all_zero})
        md += ["## Reward sparsity at the start (the checkpoint every run starts from)", "",
               (f"Groups of G = {sparsity[0].G} sampled answers in which none reaches IoU >= τ "
               "(a binary reward at τ gives them no gradient); "
               f"{sparsity[0].prompts} training prompts per twin (`experiments.sparsity`)."), "",
               "| twin | " + " | ".join(f"no hit at τ = {float(t):g}" for t in taus)
               + " | mean sampled IoU |",
               "|---|" + "---:|" * (len(taus) + 1)]
        tex += [r"\begin{tabular}{l" + "r" * (len(taus) + 1) + "}", r"\toprule",
                "twin & " + " & ".join(f"$\\tau={float(t):g}$" for t in taus)
                + r" & mean IoU \\", r"\midrule"]
        for r in sparsity:
            cells = [_pct(r.all_zero[t]) if t in r.all_zero else "—" for t in taus]
            md.append(f"| {r.dataset} | " + " | ".join(cells) + f" | {r.mean_iou:.3f} |")
            tex.append(f"{r.dataset.replace('_', chr(92) + '_')} & "
                       + " & ".join(c.replace("%", r"\%") for c in cells)
                       + f" & {r.mean_iou:.3f} \\\\")
            rows_csv += [["sparsity", r.dataset, "", "", "", f"no_hit_frac@{t}",
                          f"{r.all_zero[t]:.3f}"] for t in taus if t in r.all_zero]
            rows_csv.append(["sparsity", r.dataset, "", "", "", "mean_sampled_iou", f"{r.mean_iou:.3f}"])
        tex += [r"\bottomrule", r"\end{tabular}", ""]
        md.append("")
    md += ["## During training: dead groups and τ raises", "",
           ("Dead-group fraction = groups whose G rewards are all equal (no gradient), mean over the "
           "steps of each run; per seed in seed order. τ path: τ0, then →τ@the first step trained "
           "at the new τ."), "",
           "| twin | arm | seeds | dead-group fraction | τ raises | τ path per seed |",
           "|---|---|---|---|---|---|"]
    tex += [r"\begin{tabular}{llll}", r"\toprule",
            r"twin & arm & dead-group fraction & $\tau$ raises \\", r"\midrule"]
    for r in training:
        twin = r.dataset + (f" ({r.model})" if r.model else "")
        seeds = ", ".join(map(str, r.seeds))
        dead = _per_seed(r.dead, ".2f")
        raises = _per_seed(r.raises, "d")
        paths = "; ".join(f"s{s}: {p}" for s, p in zip(r.seeds, r.paths) if p is not None) or "—"
        md.append(f"| {twin} | {arm_label(r.arm)} | {seeds} | {dead} | {raises} | {paths} |")
        tex.append(f"{twin.replace('_', chr(92) + '_')} & {arm_label(r.arm)} & {dead} & "
                   f"{raises} \\\\")
        for i, seed in enumerate(r.seeds):
            for key, value in [("dead_group_frac", None if r.dead[i] is None else f"{r.dead[i]:.2f}"),
                               ("tau_raises", None if r.raises[i] is None else str(r.raises[i])),
                               ("tau_path", r.paths[i])]:
                if value is not None:
                    rows_csv.append(["training", r.dataset, r.model, r.arm, str(seed), key, value])
    tex += [r"\bottomrule", r"\end{tabular}", ""]
    md.append("")
    if notes:
        md += ["Notes:", *[f"- {n}" for n in notes], ""]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows_csv)
    return {"md": "\n".join(md), "tex": "\n".join(tex), "csv": buf.getvalue()}


def write_mechanism(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Build and write ``mechanism.{md,tex,csv}``; return the paths ({} when the sweep has no
    evaluated run and no sparsity probe)."""
    sparsity = sparsity_rows(sweep_dir)
    training, notes = training_rows(sweep_dir)
    if not sparsity and not training:
        return {}
    texts = render(sparsity, training, notes)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    paths = {ext: out / f"mechanism.{ext}" for ext in texts}
    atomic_write_files({paths[ext]: text for ext, text in texts.items()})
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.mechanism",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    args = parser.parse_args(argv)
    try:
        paths = write_mechanism(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        console(f"error: {err}", err=True)
        return 1
    if not paths:
        console(f"error: no evaluated run and no sparsity_*.json under {args.sweep_dir}", err=True)
        return 1
    console(paths["md"].read_text(encoding="utf-8"))
    console(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
