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
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from eval import paper_numbers as paper
from eval.significance import TestResult, format_p, paired_ttest, sign_flip_test

TableName = Literal["table1", "scale", "criteria", "schedule", "decay", "refresh"]

METRICS: tuple[str, ...] = ("acc@0.5", "acc@0.8", "pseudo_map")
"""Metric rows/columns every table shows (percent)."""

EXPECTED_SEEDS = 3
"""Seeds per cell in the paper (PAPER.md §5); a cell with another count shows "(n=k)"."""

RUN_INFO_KEYS: tuple[str, ...] = ("dataset", "arm", "seed", "model")

TABLE1_EXTRA_ARMS: tuple[str, ...] = ("zero_shot",)
"""Arms shown in Table 1 after the paper's columns when a sweep has them."""

# ---------------------------------------------------------------------------------------------
# Run discovery


@dataclass(frozen=True)
class Run:
    """One finished, evaluated training run."""

    path: Path
    dataset: str
    arm: str
    seed: int
    model: str
    metrics: dict[str, Any]

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.dataset, self.model, self.arm)


@dataclass
class Sweep:
    """All runs found under a sweep folder, with the problems met while reading them."""

    root: Path
    runs: list[Run]
    notes: list[str] = field(default_factory=list)
    _ious: dict[Path, dict[str, float] | None] = field(default_factory=dict, repr=False)

    def select(self, dataset: str, model: str | None, arm: str) -> list[Run]:
        """Runs of one dataset (and model, unless None) and arm, by seed."""
        return sorted((run for run in self.runs if run.dataset == dataset and run.arm == arm
                       and (model is None or run.model == model)), key=lambda r: r.seed)

    def sample_ious(self, run: Run) -> dict[str, float] | None:
        """``id -> IoU`` from the run's ``eval/predictions.jsonl``; None if absent or unreadable."""
        if run.path not in self._ious:
            self._ious[run.path] = self._read_ious(run)
        return self._ious[run.path]

    def _read_ious(self, run: Run) -> dict[str, float] | None:
        path = run.path / "eval" / "predictions.jsonl"
        if not path.is_file():
            return None
        out: dict[str, float] = {}
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    iou = rec["iou"]
                    out[str(rec["id"])] = 0.0 if iou is None else float(iou)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    self.notes.append(f"{path}:{line_no}: unreadable prediction line ({err!r}); "
                                      "per-sample test skipped for this run")
                    return None
        return out


def discover_runs(sweep_dir: str | Path) -> Sweep:
    """Find every run folder under ``sweep_dir`` (see module docstring)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {root} does not exist")
    runs: list[Run] = []
    notes: list[str] = []
    seen: dict[tuple[str, str, str, int], Path] = {}
    for info_path in sorted(root.rglob("run_info.json")):
        run_dir = info_path.parent
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            missing = [k for k in RUN_INFO_KEYS if k not in info]
            if missing:
                raise ValueError(f"missing keys {missing}")
            if not isinstance(info["seed"], int) or isinstance(info["seed"], bool):
                raise ValueError(f"'seed' must be an integer, got {info['seed']!r}")  # noqa: TRY004
            if not info["arm"]:
                raise ValueError("no arm (a run composed without arm=...): no table row to fill")
        except (json.JSONDecodeError, ValueError, OSError) as err:
            notes.append(f"{info_path}: unreadable run_info.json ({err}); run ignored")
            continue
        metrics_path = run_dir / "eval" / "metrics.json"
        if not metrics_path.is_file():
            notes.append(f"{run_dir}: no eval/metrics.json (not evaluated yet); run ignored")
            continue
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")  # noqa: TRY004
        except (json.JSONDecodeError, ValueError, OSError) as err:
            notes.append(f"{metrics_path}: unreadable ({err}); run ignored")
            continue
        run = Run(run_dir, str(info["dataset"]), str(info["arm"]), int(info["seed"]),
                  str(info["model"]), metrics)
        key = (*run.cell, run.seed)
        if key in seen:
            notes.append(f"{run_dir}: same dataset/model/arm/seed as {seen[key]}; "
                         "ignored (the first one is used)")
            continue
        seen[key] = run_dir
        runs.append(run)
    return Sweep(root, runs, notes)


# ---------------------------------------------------------------------------------------------
# Cells and comparisons


def _metric_value(run: Run, metric: str) -> float | None:
    v = run.metrics.get(metric)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _threshold_of(metric: str) -> float | None:
    """``"acc@0.8"`` -> 0.8; None for metrics that are not a hit rate at one threshold."""
    m = re.fullmatch(r"acc@([0-9]*\.?[0-9]+)", metric)
    return float(m.group(1)) if m else None


@dataclass
class Entry:
    """One (row, metric) of a table: our seeds, the paper's number, tests against the reference."""

    table: str
    dataset: str
    model: str
    row: str
    arm: str
    metric: str
    seeds: list[int]
    values: list[float]
    paper: float | None
    is_reference: bool
    ttest: TestResult | None = None
    image_test: TestResult | None = None

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) >= 2 else None


def compare_runs(sweep: Sweep, runs: list[Run], ref_runs: list[Run], metric: str
                 ) -> tuple[TestResult | None, TestResult | None]:
    """Paired t-test over shared seeds, and the exact sign-flip test over test images.

    The image test (``eval.significance.sign_flip_test``, Acc@t metrics only) uses the seeds that
    both rows have predictions for and the images present in every one of them; per image it
    compares the two rows' hit counts over those seeds, so an image's seeds stay together (they
    are not independent samples). Images missing from some seed are left out, with a note.
    """
    ours = {r.seed: _metric_value(r, metric) for r in runs}
    refs = {r.seed: _metric_value(r, metric) for r in ref_runs}
    seeds = sorted(s for s in ours if s in refs and ours[s] is not None and refs[s] is not None)
    ttest = None
    if len(seeds) >= 2:
        ttest = paired_ttest([ours[s] for s in seeds], [refs[s] for s in seeds])

    t = _threshold_of(metric)
    if t is None:
        return ttest, None
    run_by_seed = {r.seed: r for r in runs}
    ref_by_seed = {r.seed: r for r in ref_runs}
    per_seed: list[tuple[int, dict[str, float], dict[str, float], bool]] = []
    for s in sorted(set(run_by_seed) & set(ref_by_seed)):
        ious_a = sweep.sample_ious(run_by_seed[s])
        ious_b = sweep.sample_ious(ref_by_seed[s])
        if ious_a is None or ious_b is None:
            continue
        strict = ref_by_seed[s].metrics.get("hit_op", ">=") == ">"
        per_seed.append((s, ious_a, ious_b, strict))
    if not per_seed:
        return ttest, None
    every = set.intersection(*(set(a) & set(b) for _, a, b, _ in per_seed))
    anywhere = set.union(*(set(a) | set(b) for _, a, b, _ in per_seed))
    ids = sorted(every)
    if not ids:
        return ttest, None
    if len(anywhere) > len(ids):
        note = (f"{runs[0].dataset} ({runs[0].model}) {runs[0].arm} vs {ref_runs[0].arm}, "
                f"{metric}: {len(anywhere) - len(ids)} test image(s) are missing from some "
                f"seed's predictions and are left out of the image test ({len(ids)} used)")
        if note not in sweep.notes:
            sweep.notes.append(note)

    def hit(v: float, strict: bool) -> bool:
        return v > t if strict else v >= t

    hits_a = np.array([[hit(a[i], st) for _, a, _, st in per_seed] for i in ids])  # [n_images, S]
    hits_b = np.array([[hit(b[i], st) for _, _, b, st in per_seed] for i in ids])  # [n_images, S]
    result = sign_flip_test(hits_a, hits_b)
    result.detail["seeds"] = [s for s, *_ in per_seed]
    return ttest, result


def _entries_for_rows(table: str, sweep: Sweep, dataset: str, model: str | None,
                      rows: list[tuple[str, str, dict[str, float]]],
                      metrics: Sequence[str], ref_index: int | None) -> list[Entry]:
    """Entries for labelled rows of one block; ``rows`` = (label, arm, {metric: paper value});
    row ``ref_index`` is the reference for the tests."""
    selected = [sweep.select(dataset, model, arm) for _, arm, _ in rows]
    out: list[Entry] = []
    for i, ((label, arm, paper_values), runs) in enumerate(zip(rows, selected)):
        for metric in metrics:
            vals = [(r.seed, _metric_value(r, metric)) for r in runs]
            vals = [(s, v) for s, v in vals if v is not None]
            entry = Entry(table, dataset, model or "", label, arm, metric,
                          [s for s, _ in vals], [v for _, v in vals], paper_values.get(metric),
                          is_reference=(i == ref_index))
            if ref_index is not None and i != ref_index and runs and selected[ref_index]:
                entry.ttest, entry.image_test = compare_runs(sweep, runs,
                                                             selected[ref_index], metric)
            out.append(entry)
    return out


def _datasets_for(sweep: Sweep, arms: set[str], paper_dataset: str | None) -> list[str]:
    """Datasets that have runs of one of ``arms``, paper datasets first; if none, the paper's."""
    found = {r.dataset for r in sweep.runs if r.arm in arms}
    order = {d: i for i, d in enumerate(paper.PAPER_DATASETS)}
    ds = sorted(found, key=lambda d: (order.get(paper.base_dataset(d), len(order)), d))
    if not ds:
        ds = [paper_dataset] if paper_dataset else []
    return ds


def _models_for(sweep: Sweep, dataset: str, arms: set[str]) -> list[str]:
    models = sorted({r.model for r in sweep.runs if r.dataset == dataset and r.arm in arms})
    return models or [""]


# ---------------------------------------------------------------------------------------------
# Table definitions


@dataclass
class Table:
    """Entries plus how to lay them out."""

    name: str
    title: str
    layout: Literal["wide", "long"]  # wide: methods as columns (Table 1); long: rows x metrics
    entries: list[Entry]
    primary_metric: str
    notes: list[str]


def build_table1(sweep: Sweep) -> Table:
    """Table 1: datasets x metrics, one column per arm (the paper's five, then extras).

    A paper column stays (with the paper's numbers beside "—") when it did not run, unless an arm
    that stands for it (``paper.STANDS_FOR``: another preset of the method) ran: that one takes
    its place. Arms of no table at all (a new arm) come last, by name.
    """
    present = {r.arm for r in sweep.runs}
    arms: list[str] = []
    for a in paper.TABLE1_ARMS:
        stand_ins = [b for b, of in paper.STANDS_FOR.items() if of == a and b in present]
        if a in present or not stand_ins:
            arms.append(a)
        arms += stand_ins
    arms += [a for a in TABLE1_EXTRA_ARMS if a in present]
    known_elsewhere = (set(paper.ARM_LABELS) | set(paper.STANDS_FOR)
                       | {a for spec in _ABLATIONS.values() for _, a, _ in spec[3]})
    arms += sorted(a for a in present if a not in known_elsewhere and a not in arms)
    keys = set(arms)

    datasets = _datasets_for(sweep, keys, None)
    # The paper's three rows always appear in a sweep of real data (a missing one shows the paper's
    # numbers beside "—"); a phantom sweep shows only the twins it ran.
    if not any(d.startswith("phantom_") for d in datasets):
        for d in paper.PAPER_DATASETS:
            if not any(paper.base_dataset(x) == d for x in datasets):
                datasets.append(d)
    order = {d: i for i, d in enumerate(paper.PAPER_DATASETS)}
    datasets.sort(key=lambda d: (order.get(paper.base_dataset(d), len(order)), d))

    entries: list[Entry] = []
    for dataset in datasets:
        for model in _models_for(sweep, dataset, keys):
            # The paper's Table 1 is 3B: its numbers sit beside a 3B model or a model with no
            # size in its name (e.g. the tiny embedded stand-in), not beside 7B/32B runs.
            comparable = _model_size(model) in (None, "3b")
            rows = []
            for a in arms:
                paper_values = {metric: paper.TABLE1[(paper.base_dataset(dataset), metric)][a]
                                for metric in METRICS if comparable
                                and a in paper.TABLE1.get((paper.base_dataset(dataset), metric), {})}
                rows.append((paper.ARM_LABELS.get(a, a), a, paper_values))
            entries += _entries_for_rows("table1", sweep, dataset, model or None, rows, METRICS,
                                         ref_index=0)
    return Table("table1", "Table 1: Acc@IoU and pseudo-mAP (%) on the test split",
                 "wide", entries, "acc@0.5", [])


_ABLATIONS: dict[str, tuple[str, str | None, str, list[tuple[str, str, float | None]]]] = {
    # name: (title, paper dataset, paper metric, [(row label, arm, paper)])
    "criteria": (
        "Update-criteria ablation", paper.CRITERIA_DATASET, paper.CRITERIA_METRIC, [
            ("Full (all three checks)", "medloc", paper.CRITERIA["medloc"]),
            ("w/o reward check", "no_reward_check", paper.CRITERIA["no_reward_check"]),
            ("w/o IoU-margin check", "no_margin_check", paper.CRITERIA["no_margin_check"]),
            ("w/o stability check", "no_stability_check", paper.CRITERIA["no_stability_check"]),
            ("Reward check only", "reward_check_only", paper.CRITERIA["reward_check_only"]),
        ]),
    "schedule": (
        "Schedule-strategy ablation", paper.SCHEDULE_DATASET, paper.SCHEDULE_METRIC, [
            ("Adaptive (MedLoc-R1)", "medloc", paper.SCHEDULE["medloc"]),
            ("Fixed-Conservative", "fixed_conservative", paper.SCHEDULE["fixed_conservative"]),
            ("Fixed-Moderate", "fixed_moderate", paper.SCHEDULE["fixed_moderate"]),
            ("Fixed-Aggressive", "fixed_aggressive", paper.SCHEDULE["fixed_aggressive"]),
        ]),
    "decay": (
        "Step-size decay forms (no paper numbers in PAPER.md)", None, "acc@0.5", [
            ("Piecewise", "medloc", None),
            ("Linear", "medloc_linear", None),
            ("Cosine", "medloc_cosine", None),
        ]),
    "refresh": (
        "Window-refresh ablation (no paper numbers in PAPER.md)", None, "acc@0.5", [
            ("Semi (drop oldest N/2)", "medloc", None),
            ("Full (drop all)", "refresh_full", None),
            ("Quarter (drop oldest N/4)", "refresh_quarter", None),
            ("None (keep all)", "refresh_none", None),
        ]),
}


def build_ablation(sweep: Sweep, name: str) -> Table:
    """criteria / schedule / decay / refresh: one block per (dataset, model), rows x metrics."""
    title, paper_dataset, paper_metric, spec = _ABLATIONS[name]
    keys = {a for _, a, _ in spec}
    entries: list[Entry] = []
    for dataset in _datasets_for(sweep, keys, paper_dataset or paper.PAPER_DATASETS[0]):
        on_paper_dataset = paper.base_dataset(dataset) == paper_dataset
        for model in _models_for(sweep, dataset, keys):
            comparable = on_paper_dataset and _model_size(model) in (None, "3b")  # paper: 3B
            rows = [(label, a, {paper_metric: value} if value is not None and comparable else {})
                    for label, a, value in spec]
            entries += _entries_for_rows(name, sweep, dataset, model or None, rows, METRICS,
                                         ref_index=0)
    return Table(name, f"{title}: {paper.METRIC_LABELS[paper_metric]} and more (%)", "long",
                 entries, paper_metric, [])


def _model_size(model: str) -> str | None:
    """``"qwen2_5_vl_7b"``, ``"Qwen2.5-VL-7B-Instruct"`` -> ``"7b"``; None when no size is named."""
    sizes = re.findall(r"(?<![0-9a-z.])(\d+(?:\.\d+)?)b(?![0-9a-z])", model.lower())
    return f"{sizes[-1]}b" if sizes else None


def build_scale(sweep: Sweep) -> Table:
    """Model scale: MedLoc-R1 as published, one row per model, one block per dataset."""
    keys = {paper.REFERENCE_ARM}
    entries: list[Entry] = []
    for dataset in _datasets_for(sweep, keys, paper.SCALE_DATASET):
        on_paper = paper.base_dataset(dataset) == paper.SCALE_DATASET
        models = [m for m in _models_for(sweep, dataset, keys) if m]

        def size_key(m: str) -> tuple[float, str]:
            s = _model_size(m)
            return (float(s[:-1]) if s else math.inf, m)

        models.sort(key=size_key)
        if on_paper:  # the paper's sizes that did not run still get a row with the paper's number
            ran = {_model_size(m) for m in models}
            models += [size.upper() for size in paper.SCALE if size not in ran]
        for model in models:
            size = _model_size(model)
            paper_value = paper.SCALE.get(size or "") if on_paper else None
            rows = [(model, paper.REFERENCE_ARM,
                     {paper.SCALE_METRIC: paper_value} if paper_value is not None else {})]
            # Different models are not paired samples of one method: no tests here.
            entries += _entries_for_rows("scale", sweep, dataset, model, rows, METRICS,
                                         ref_index=None)
    return Table("scale", "Model scale, MedLoc-R1 (%)", "long", entries, paper.SCALE_METRIC, [])


def build_table(sweep: Sweep, name: TableName) -> Table:
    if name == "table1":
        table = build_table1(sweep)
    elif name == "scale":
        table = build_scale(sweep)
    elif name in ("criteria", "schedule", "decay", "refresh"):
        table = build_ablation(sweep, name)
    else:
        raise ValueError(f"table={name!r}; expected one of {get_args(TableName)}")
    table.notes = list(sweep.notes)
    return table


# ---------------------------------------------------------------------------------------------
# Rendering

Fmt = Literal["md", "tex"]


def _tex_escape(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        s = s.replace(ch, "\\" + ch)
    return s.replace("τ", r"$\tau$").replace("±", r"$\pm$").replace("—", "--")


def _cell(e: Entry | None, fmt: Fmt, with_paper: bool = True) -> str:
    """``94.10 ± 0.30 [94.46]``; "—" for a missing value."""
    dash = "—" if fmt == "md" else "--"
    pm = " ± " if fmt == "md" else r" $\pm$ "
    if e is None:
        return dash
    ours = dash
    if e.mean is not None:
        ours = f"{e.mean:.2f}" + (f"{pm}{e.std:.2f}" if e.std is not None else "")
        if len(e.values) != EXPECTED_SEEDS:
            ours += f" (n={len(e.values)})"
    if with_paper and e.paper is not None:
        ours += f" [{e.paper:.2f}]"
    return ours


def _p_cell(e: Entry | None, fmt: Fmt) -> str:
    dash = "—" if fmt == "md" else "--"
    if e is None or e.is_reference:
        return dash
    t = format_p(e.ttest.p_value) if e.ttest else "—"
    m = format_p(e.image_test.p_value) if e.image_test else "—"
    if t == "—" and m == "—":
        return dash
    s = f"t {t} / img {m}"
    return s if fmt == "md" else _tex_escape(s.replace("<", "$<$"))


def _block_label(dataset: str, model: str, show_model: bool) -> str:
    return f"{dataset} ({model})" if show_model and model else dataset


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _tex_table(header: list[str], rows: list[list[str]], caption: str, n_left: int) -> str:
    spec = "l" * n_left + "c" * (len(header) - n_left)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_tex_escape(caption)}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def _grid(table: Table, fmt: Fmt) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, header, rows) for each tabular of the table, in the given format."""
    esc = (lambda s: s) if fmt == "md" else _tex_escape
    blocks: dict[tuple[str, str], list[Entry]] = {}
    for e in table.entries:  # scale: one block per dataset, its rows are the models
        blocks.setdefault((e.dataset, "" if table.name == "scale" else e.model), []).append(e)
    show_model = len({m for _, m in blocks if m}) > 1
    metric_label = {m: paper.METRIC_LABELS.get(m, m) for m in METRICS}
    out = []
    if table.layout == "wide":
        columns = list(dict.fromkeys(e.row for e in table.entries))
        ref = columns[0]
        header = ["Dataset", "Metric"] + [esc(c) for c in columns]
        body, sig = [], []
        for (dataset, model), es in blocks.items():
            lookup = {(e.row, e.metric): e for e in es}
            for metric in METRICS:
                left = [esc(_block_label(dataset, model, show_model)), esc(metric_label[metric])]
                body.append(left + [_cell(lookup.get((c, metric)), fmt) for c in columns])
                sig.append(left + [_p_cell(lookup.get((c, metric)), fmt) for c in columns[1:]])
        out.append((f"{table.title}. Ours: mean ± std over seeds; [paper].", header, body))
        sig_caption = (f"Paired tests vs {ref}: t = paired t-test over seeds, img = exact "
                       "sign-flip test over test images, each image's seeds kept together "
                       "(p-values).")
        out.append((sig_caption, ["Dataset", "Metric"] + [esc(c) for c in columns[1:]], sig))
        return out
    header = ["Configuration"] + [esc(metric_label[m]) for m in METRICS]
    if table.name != "scale":
        header.append(esc(f"p vs ref ({metric_label[table.primary_metric]})"))
    for (dataset, model), es in blocks.items():
        rows_order = list(dict.fromkeys(e.row for e in es))
        lookup = {(e.row, e.metric): e for e in es}
        body = []
        for r in rows_order:
            line = [esc(r)] + [_cell(lookup.get((r, m)), fmt) for m in METRICS]
            if table.name != "scale":
                line.append(_p_cell(lookup.get((r, table.primary_metric)), fmt))
            body.append(line)
        caption = (f"{table.title}. {_block_label(dataset, model, True)}. "
                   "Ours: mean ± std over seeds; [paper].")
        if table.name != "scale":
            caption += " Tests are paired against the first row."
        out.append((caption, header, body))
    return out


def render_markdown(table: Table) -> str:
    parts = [f"## {table.title}", ""]
    for caption, header, rows in _grid(table, "md"):
        parts += [caption, "", _md_table(header, rows), ""]
    if table.notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in table.notes] + [""]
    return "\n".join(parts)


def render_latex(table: Table) -> str:
    grids = _grid(table, "tex")
    n_left = 2 if table.layout == "wide" else 1
    return "\n\n".join(_tex_table(h, r, c, n_left) for c, h, r in grids) + "\n"


CSV_COLUMNS = ["table", "dataset", "model", "row", "arm", "metric", "n_seeds",
               "seeds", "mean", "std", "paper", "is_reference", "ttest_t", "ttest_p",
               "signflip_p", "signflip_n_images", "signflip_seeds", "signflip_a_better",
               "signflip_b_better", "signflip_tied"]


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def num(x: float | None) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

    def image_columns(r: TestResult) -> list[Any]:
        return [num(r.p_value), r.n, " ".join(map(str, r.detail["seeds"])),
                r.detail["n_a_better"], r.detail["n_b_better"], r.detail["n_tied"]]

    for e in table.entries:
        writer.writerow([
            e.table, e.dataset, e.model, e.row, e.arm, e.metric, len(e.values),
            " ".join(map(str, e.seeds)), num(e.mean), num(e.std), num(e.paper), e.is_reference,
            num(e.ttest.statistic) if e.ttest else "", num(e.ttest.p_value) if e.ttest else "",
            *(image_columns(e.image_test) if e.image_test else [""] * 6),
        ])
    return buf.getvalue()


def _write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_table(table: Table, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.tex``, ``<name>.csv`` into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")}
    _write_text_atomic(render_markdown(table), paths["md"])
    _write_text_atomic(render_latex(table), paths["tex"])
    _write_text_atomic(render_csv(table), paths["csv"])
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
        print(f"error: {err}", file=sys.stderr)
        return 1
    names = get_args(TableName) if args.table == "all" else (args.table,)
    out_dir = args.out if args.out is not None else args.sweep_dir
    print(f"{len(sweep.runs)} evaluated run(s) under {args.sweep_dir}", file=sys.stderr)
    for note in sweep.notes:
        print(f"note: {note}", file=sys.stderr)
    for name in names:
        table = build_table(sweep, name)
        paths = write_table(table, out_dir)
        print(render_markdown(table))
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
