"""One cell of a results table: a row's seeds for one metric, the paper's number beside them, and
the tests against the table's reference row (a paired t-test over seeds; for Acc@t an exact
sign-flip test over test images that keeps each image's seeds together)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from eval.runs import Run, Sweep
from eval.significance import TestResult, paired_ttest, sign_flip_test

EXPECTED_SEEDS = 3
"""Seeds per cell in the paper (docs/method.md §5); a cell with another count shows "(n=k)"."""


def metric_value(run: Run, metric: str) -> float | None:
    """The run's value of ``metric`` from ``eval/metrics.json``; None if absent or not finite."""
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
    ours = {r.seed: metric_value(r, metric) for r in runs}
    refs = {r.seed: metric_value(r, metric) for r in ref_runs}
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

