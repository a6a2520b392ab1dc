"""Paired significance tests of a method against MedLoc-R1 (PAPER.md §5).

With three seeds per cell a seed-level test has little power (a Wilcoxon signed-rank test cannot
go below p = 0.25 with n = 3), so two kinds of test are offered:

- ``paired_ttest``: over seeds, pairing the runs that share a seed (PAPER.md §5);
- ``mcnemar`` and ``paired_bootstrap``: over test samples, pairing the two methods' hit/miss on
  the same sample (pooled over seeds, matched by (seed, sample id), by the caller).

Every function returns a ``TestResult``; ``effect`` is always "a minus b" in the input's units
(for 0/1 hits: a fraction, multiply by 100 for percentage points).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from scipy import stats

McNemarMethod = Literal["auto", "exact", "chi2"]


@dataclass(frozen=True)
class TestResult:
    """Outcome of one paired test. ``p_value`` is two-sided; NaN where the test is undefined."""

    __test__ = False  # not a pytest test class, despite the name

    test: str
    statistic: float
    p_value: float
    n: int
    effect: float
    detail: dict[str, Any] = field(default_factory=dict)


def _paired_arrays(a: Sequence[float], b: Sequence[float], what: str) -> tuple[np.ndarray, ...]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"{what}: a and b must be 1-D of equal length; got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{what}: values must be finite")
    return x, y


def paired_ttest(a_seeds: Sequence[float], b_seeds: Sequence[float]) -> TestResult:
    """Paired t-test over seeds: ``a_seeds[i]`` and ``b_seeds[i]`` are two methods' metric for seed i.

    Uses ``scipy.stats.ttest_rel``. Needs at least two pairs. When the seed differences are all
    exactly equal (zero variance) the t statistic is undefined: statistic and p-value are NaN.
    """
    x, y = _paired_arrays(a_seeds, b_seeds, "paired_ttest")
    if x.size < 2:
        raise ValueError(f"paired_ttest needs at least 2 paired seeds, got {x.size}")
    diffs = x - y
    if np.all(diffs == diffs[0]):
        # Zero variance: t is undefined (scipy would answer inf/0 or NaN depending on rounding).
        return TestResult("paired_t", math.nan, math.nan, int(x.size), float(diffs[0]),
                          {"df": int(x.size - 1)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-zero variance: scipy warns
        res = stats.ttest_rel(x, y)
    return TestResult("paired_t", float(res.statistic), float(res.pvalue), int(x.size),
                      float(np.mean(x - y)), {"df": int(x.size - 1)})


def _as_hits(h: Sequence[bool], name: str) -> np.ndarray:
    arr = np.asarray(h)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1")
        arr = arr.astype(bool)
    return arr


def mcnemar(
    hits_a: Sequence[bool],
    hits_b: Sequence[bool],
    method: McNemarMethod = "auto",
    exact_below: int = 25,
) -> TestResult:
    """McNemar's test on paired hits.

    Only discordant samples matter: ``n_a_only`` (a hit, b missed) and ``n_b_only``. Under the
    null each discordant sample is a fair coin, so

    - ``"exact"``: p = two-sided ``scipy.stats.binomtest(n_a_only, n_a_only + n_b_only, 0.5)``;
    - ``"chi2"``: continuity-corrected ``(|n_a_only - n_b_only| - 1)^2 / (n_a_only + n_b_only)``
      against chi-square with 1 degree of freedom;
    - ``"auto"`` (default): exact when there are fewer than ``exact_below`` discordant samples
      (the usual rule of thumb, 25), chi-square otherwise.

    No discordant sample: p = 1. ``statistic`` is ``n_a_only`` for the exact test, the chi-square
    value otherwise; ``effect`` is ``(n_a_only - n_b_only) / n``, the accuracy difference.
    """
    if method not in get_args(McNemarMethod):
        raise ValueError(f"method={method!r}; expected one of {get_args(McNemarMethod)}")
    a, b = _as_hits(hits_a, "hits_a"), _as_hits(hits_b, "hits_b")
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"hits_a and hits_b must be non-empty and equal length; got {a.size}, "
                         f"{b.size}")
    n_a_only = int(np.sum(a & ~b))
    n_b_only = int(np.sum(~a & b))
    discordant = n_a_only + n_b_only
    detail = {"n_a_only": n_a_only, "n_b_only": n_b_only}
    effect = (n_a_only - n_b_only) / a.size
    use_exact = method == "exact" or (method == "auto" and discordant < exact_below)
    if discordant == 0:
        return TestResult("mcnemar_exact" if use_exact else "mcnemar_chi2", 0.0, 1.0, int(a.size),
                          effect, detail)
    if use_exact:
        p = stats.binomtest(n_a_only, discordant, 0.5, alternative="two-sided").pvalue
        return TestResult("mcnemar_exact", float(n_a_only), float(p), int(a.size), effect, detail)
    chi2 = (abs(n_a_only - n_b_only) - 1.0) ** 2 / discordant
    p = stats.chi2.sf(chi2, df=1)
    return TestResult("mcnemar_chi2", float(chi2), float(p), int(a.size), effect, detail)


def paired_bootstrap(
    hits_a: Sequence[float],
    hits_b: Sequence[float],
    n_boot: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> TestResult:
    """Paired bootstrap over samples of the mean difference ``mean(a) - mean(b)``.

    Resamples sample indices with replacement ``n_boot`` times (numpy ``default_rng(seed)``), the
    same indices for a and b, giving bootstrap differences ``d*``. Two-sided p-value by the
    shifted-null rule: ``p = (1 + #{|d* - d| >= |d|}) / (n_boot + 1)`` with ``d`` the observed
    difference (so ``d = 0`` gives p = 1, and a difference no resample can erase gives the smallest
    possible p, ``1 / (n_boot + 1)``). ``detail`` holds the percentile confidence interval of the
    difference (``ci_low``, ``ci_high``) at level ``confidence``. Works for 0/1 hits and for any
    paired per-sample score (e.g. IoU).
    """
    x, y = _paired_arrays(hits_a, hits_b, "paired_bootstrap")
    if x.size == 0:
        raise ValueError("paired_bootstrap needs at least one sample")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}; expected >= 1")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; expected in (0, 1)")
    diffs = x - y  # [n]
    observed = float(diffs.mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)  # [n_boot]
    chunk = max(1, 2_000_000 // x.size)  # bound memory: at most ~2M indices at a time
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))  # [chunk, n]
        boot[start:stop] = diffs[idx].mean(axis=1)
    # A small tolerance so that resamples equal to the observed difference up to rounding count.
    tol = 1e-12 * max(1.0, abs(observed))
    extreme = int(np.sum(np.abs(boot - observed) >= abs(observed) - tol))
    p = (1 + extreme) / (n_boot + 1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return TestResult("paired_bootstrap", observed, float(min(1.0, p)), int(x.size), observed,
                      {"ci_low": float(lo), "ci_high": float(hi), "n_boot": n_boot, "seed": seed,
                       "confidence": confidence})


def format_p(p: float | None) -> str:
    """A p-value for a table: ``"—"`` when absent/undefined, ``"<0.001"`` when tiny, else 3 digits."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    if p < 1e-3:
        return "<0.001"
    return f"{p:.3f}"
