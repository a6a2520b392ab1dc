"""What each of the paper's tables holds (docs/method.md §5, §6): which arms are its rows or columns, on
which datasets and models, with which of the paper's numbers beside ours; ``build_table`` fills one
from a sweep's runs (``eval.runs``) as cells (``eval.cells``)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from eval import paper_numbers as paper
from eval.cells import Entry, compare_runs, metric_value
from eval.runs import Run, Sweep, read_metrics_jsonl
from eval.tau_paths import first_difference, trained_path

TableName = Literal["table1", "scale", "criteria", "schedule", "decay", "refresh", "beyond"]

METRICS: tuple[str, ...] = ("acc@0.5", "acc@0.8", "pseudo_map")
"""Metric rows/columns every table shows (percent)."""

TABLE1_EXTRA_ARMS: tuple[str, ...] = ("zero_shot",)
"""Arms shown in Table 1 after the paper's columns when a sweep has them."""


def _entries_for_rows(table: str, sweep: Sweep, dataset: str, model: str | None,
                      rows: list[tuple[str, str, dict[str, float]]],
                      metrics: Sequence[str], ref_index: int | None) -> list[Entry]:
    """Entries for labelled rows of one block; ``rows`` = (label, arm, {metric: paper value});
    row ``ref_index`` is the reference for the tests."""
    selected = [sweep.select(dataset, model, arm) for _, arm, _ in rows]
    out: list[Entry] = []
    for i, ((label, arm, paper_values), runs) in enumerate(zip(rows, selected)):
        for metric in metrics:
            vals = [(r.seed, metric_value(r, metric)) for r in runs]
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
        "Step-size decay forms (no paper numbers in docs/method.md)", None, "acc@0.5", [
            ("Piecewise", "medloc", None),
            ("Linear", "medloc_linear", None),
            ("Cosine", "medloc_cosine", None),
        ]),
    "refresh": (
        "Window-refresh ablation (no paper numbers in docs/method.md)", None, "acc@0.5", [
            ("Semi (drop oldest N/2)", "medloc", None),
            ("Full (drop all)", "refresh_full", None),
            ("Quarter (drop oldest N/4)", "refresh_quarter", None),
            ("None (keep all)", "refresh_none", None),
        ]),
}


ABLATION_TABLES: tuple[str, ...] = tuple(_ABLATIONS)
"""The ablation tables: the first row of each is the full rule (MedLoc-R1 as published)."""

SAME_TAU_PATH = "same τ trajectory as the full rule"


def ablation_rows(name: str) -> list[tuple[str, str]]:
    """``[(row label, arm), ...]`` of an ablation table, the reference (full rule) first."""
    if name not in _ABLATIONS:
        raise ValueError(f"table={name!r}; expected one of {ABLATION_TABLES}")
    return [(label, arm) for label, arm, _ in _ABLATIONS[name][3]]


def same_tau_path(runs: Sequence[Run], reference: Sequence[Run]) -> bool:
    """True when every seed both rows ran took, in training, the τ path of the reference's run of
    that seed (same τ at every step): the two rows are then the same rule in practice, and
    their numbers differ by nothing but chance. False when no seed can be compared."""
    by_seed = {r.seed: r for r in reference}
    pairs = [(r, by_seed[r.seed]) for r in runs if r.seed in by_seed]
    if not pairs:
        return False
    for run, ref in pairs:
        try:
            a, b = trained_path(run.path), trained_path(ref.path)
        except (OSError, ValueError):
            return False
        if a is None or b is None or first_difference(a, b) is not None or a.taus != b.taus:
            return False
    return True


def build_ablation(sweep: Sweep, name: str) -> Table:
    """criteria / schedule / decay / refresh: one block per (dataset, model), rows x metrics.

    A row whose trained runs took exactly the full rule's τ path in every seed says so in its
    label (``SAME_TAU_PATH``): its numbers are not a finding about its rule."""
    title, paper_dataset, paper_metric, spec = _ABLATIONS[name]
    keys = {a for _, a, _ in spec}
    entries: list[Entry] = []
    marked = False
    for dataset in _datasets_for(sweep, keys, paper_dataset or paper.PAPER_DATASETS[0]):
        on_paper_dataset = paper.base_dataset(dataset) == paper_dataset
        for model in _models_for(sweep, dataset, keys):
            comparable = on_paper_dataset and _model_size(model) in (None, "3b")  # paper: 3B
            reference = sweep.select(dataset, model or None, spec[0][1])
            rows = []
            for i, (label, a, value) in enumerate(spec):
                if i > 0 and same_tau_path(sweep.select(dataset, model or None, a), reference):
                    label, marked = f"{label} ({SAME_TAU_PATH})", True
                rows.append((label, a, {paper_metric: value} if value is not None and comparable
                             else {}))
            entries += _entries_for_rows(name, sweep, dataset, model or None, rows, METRICS,
                                         ref_index=0)
    note = (f"A row marked '{SAME_TAU_PATH}' raised τ at the same steps to the same values as "
            "the full rule in every seed: in these runs it made the full rule's decisions. "
            f"python -m eval.replay_panel SWEEP_DIR --table {name} shows, on the same IoUs, "
            "which decisions its rule changes.")
    notes = [note] if marked else []
    return Table(name, f"{title}: {paper.METRIC_LABELS[paper_metric]} and more (%)", "long",
                 entries, paper_metric, notes)


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


BEYOND_ROWS: tuple[tuple[str, str], ...] = (
    ("MedLoc-R1", "medloc"),
    ("MedLoc-R1, calibrated curriculum", "medloc_calibrated"),
    ("MedLoc-R1 + hybrid reward", "medloc_hybrid"),
    ("MedLoc-R1 + band reward", "medloc_band"),
)
"""Beyond the paper (docs/beyond.md): (column label, arm); the first, MedLoc-R1 as published,
is the reference of the tests. It has no paper numbers: the paper has no such table."""


def build_beyond(sweep: Sweep) -> Table:
    """Beyond the paper: Table 1's form (datasets x metrics, one column per arm, both tests against
    MedLoc-R1) for MedLoc-R1 and its three new arms; no paper numbers. The training side (dead-group
    fraction, raises) is :func:`training_summary`."""
    keys = {a for _, a in BEYOND_ROWS}
    entries: list[Entry] = []
    for dataset in _datasets_for(sweep, keys, None):
        for model in _models_for(sweep, dataset, keys):
            rows = [(label, arm, {}) for label, arm in BEYOND_ROWS]
            entries += _entries_for_rows("beyond", sweep, dataset, model or None, rows, METRICS,
                                         ref_index=0)
    return Table("beyond", "Beyond the paper: Acc@IoU and pseudo-mAP (%) on the test split",
                 "wide", entries, "acc@0.5", [])


@dataclass(frozen=True)
class TrainingRow:
    """One arm on one (dataset, model): per seed, the mean dead-group fraction over the training
    steps (``reward/dead_group_frac``), the number of raises and the final τ (``metrics.jsonl``)."""

    dataset: str
    model: str
    label: str
    arm: str
    seeds: tuple[int, ...]
    dead_group_frac: tuple[float, ...]
    raises: tuple[int, ...]
    final_tau: tuple[float, ...]


def run_training_summary(run: Run) -> tuple[float, int, float] | None:
    """(mean dead-group fraction over steps, raises, last logged τ) of a trained run's log; None
    when it logged no dead-group fraction or no τ."""
    log = run.path / "metrics.jsonl"
    if not log.is_file():
        return None
    dead = read_metrics_jsonl(log, "reward/dead_group_frac")
    raises = read_metrics_jsonl(log, "curriculum/raises")
    taus = read_metrics_jsonl(log, "curriculum/tau")
    if not dead or not raises or not taus:
        return None
    last = max(raises)
    return (float(sum(dead.values()) / len(dead)), int(raises[last]), float(taus[max(taus)]))


def training_summary(sweep: Sweep, rows: Sequence[tuple[str, str]] = BEYOND_ROWS
                     ) -> list[TrainingRow]:
    """Dead-group fraction, raises and final τ of each (dataset, model, arm) of ``rows``."""
    keys = {a for _, a in rows}
    out: list[TrainingRow] = []
    for dataset in _datasets_for(sweep, keys, None):
        for model in _models_for(sweep, dataset, keys):
            for label, arm in rows:
                found = [(r.seed, run_training_summary(r))
                         for r in sweep.select(dataset, model or None, arm)]
                found = sorted((seed, v) for seed, v in found if v is not None)
                out.append(TrainingRow(dataset, model, label, arm, tuple(s for s, _ in found),
                                       tuple(v[0] for _, v in found), tuple(v[1] for _, v in found),
                                       tuple(v[2] for _, v in found)))
    return out


def build_table(sweep: Sweep, name: TableName) -> Table:
    if name == "table1":
        table = build_table1(sweep)
    elif name == "scale":
        table = build_scale(sweep)
    elif name in ("criteria", "schedule", "decay", "refresh"):
        table = build_ablation(sweep, name)
    elif name == "beyond":
        table = build_beyond(sweep)
    else:
        raise ValueError(f"table={name!r}; expected one of {get_args(TableName)}")
    table.notes = [*sweep.notes, *table.notes]
    return table
