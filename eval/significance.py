"""Paired significance tests of a method against MedLoc-R1 (docs/method.md §5).

With three seeds per cell a seed-level test has little power (a Wilcoxon signed-rank test cannot
go below p = 0.25 with n = 3), tests over the test set are offered beside the one over seeds:

- ``paired_ttest``: over seeds, pairing the runs that share a seed (docs/method.md §5);
- ``sign_flip_test``: over test images, pairing the two methods on the same image and keeping an
  image's seeds together (the exact test ``eval.table`` uses for Acc@t; with one seed it is the
  exact McNemar test);
- ``mcnemar`` and ``paired_bootstrap``: over single paired samples (one seed). Do not pool the
  seeds of a test image into them as if they were independent samples: an image that one method
  finds and the other misses tends to do so in every seed, and the pooled McNemar test then
  rejects a true null far more often than α (15.9% at α = 0.05 in the simulation of issue 10;
  14-15% in the similar one in ``tests/unit/test_eval_significance.py``, where
  ``sign_flip_test`` stays at 4.5-5.3%).

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
    - ``"chi2"``: continuity-corrected ``max(0, |n_a_only - n_b_only| - 1)^2 / (n_a_only +
      n_b_only)`` against chi-square with 1 degree of freedom. The floor at zero matters: without
      it a difference of 0 (13 vs 13) would give ``(0 - 1)^2 / 26`` and p = 0.845 instead of 1;
      a difference of 1 (13 vs 12) gives 0 and p = 1 either way;
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
    # Continuity correction, floored at zero: |difference| <= 1 is no evidence at all (p = 1).
    chi2 = max(0.0, abs(n_a_only - n_b_only) - 1.0) ** 2 / discordant
    p = stats.chi2.sf(chi2, df=1)
    return TestResult("mcnemar_chi2", float(chi2), float(p), int(a.size), effect, detail)


def _as_hit_matrix(h: Sequence[Any], name: str) -> np.ndarray:
    arr = np.asarray(h)
    if arr.ndim == 1:
        arr = arr[:, None]  # one seed
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [n_images, n_seeds] (or 1-D for one seed), got shape "
                         f"{arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1")
        arr = arr.astype(bool)
    return arr


def _sign_flip_null_pmf(magnitudes: np.ndarray) -> np.ndarray:
    """Exact null distribution of ``T = sum_i e_i * m_i`` with independent fair signs ``e_i``.

    ``magnitudes``: positive integers ``m_i``. Returns ``pmf`` of length ``2 M + 1`` with
    ``M = sum m_i``; ``pmf[j] = P(T = j - M)``. Images with the same magnitude ``v`` are grouped:
    their part of T is ``v * (2 X_v - k_v)`` with ``X_v ~ Binomial(k_v, 1/2)``, and the groups are
    convolved (one ``np.convolve`` per distinct magnitude, at most n_seeds of them).
    """
    pmf = np.ones(1)
    values, counts = np.unique(magnitudes, return_counts=True)
    for v, k in zip(values.tolist(), counts.tolist()):
        part = np.zeros(2 * v * k + 1)  # support -v*k .. v*k in steps of 2v
        part[:: 2 * v] = stats.binom.pmf(np.arange(k + 1), k, 0.5)
        pmf = np.convolve(pmf, part)
    return pmf


def sign_flip_test(hits_a: Sequence[Any], hits_b: Sequence[Any]) -> TestResult:
    """Exact paired sign-flip (permutation) test over test images, seeds kept together.

    ``hits_a[i, s]`` and ``hits_b[i, s]`` are the two methods' hit (bool or 0/1) on test image i
    in seed s, shape ``[n_images, n_seeds]`` (a 1-D input is one seed). Per image the statistic
    uses ``c_i = sum_s hits_a[i, s] - sum_s hits_b[i, s]``, an integer in ``[-S, S]`` (S seeds);
    the test statistic is ``T = sum_i c_i``, i.e. the difference of the two accuracies times
    ``n_images * S``.

    Null hypothesis: on every image the two methods are exchangeable (swapping the labels "a" and
    "b" on an image leaves the joint distribution of its hits unchanged), images independent. Then
    each ``c_i`` is symmetric about 0 whatever the image's difficulty and however strongly its
    hits are correlated across seeds, so, given the ``|c_i|``, the signs are independent fair
    coins. The p-value is computed exactly from that distribution (a convolution of binomials,
    no Monte Carlo, no seed): two-sided ``p = P(|T*| >= |T|)`` with ``T* = sum_i e_i |c_i|``.

    Why this test rather than pooling: the unit that is sampled is the test image, not the
    (image, seed) pair. Pooling seeds into McNemar treats an image that one method finds in all
    three seeds and the other misses in all three as three independent discordant samples and
    rejects a true null far too often (15.9% at α = 0.05 in issue 10's simulation). Flipping the
    sign of a whole image keeps its seeds together.

    Why not a paired bootstrap over images (the other valid choice): it is only asymptotically
    right (with few images that differ, the common case at Acc@0.8, it tends to reject too often:
    3 images, all one way, out of 200 give a shifted-null bootstrap p of about 0.13 where the
    exact answer is 2 / 2^3 = 0.25), and its p-value carries Monte-Carlo noise. The sign-flip test is exact at every sample size, deterministic,
    and with one seed it *is* the exact McNemar test (two-sided binomial on the discordant pairs).

    What it does not cover: the trained models are taken as given. Variation between training
    runs (a bad seed that lowers every image) is what the paired t-test over seeds speaks to; this
    test asks whether these runs differ on this image population.

    Returns ``TestResult("sign_flip_exact", statistic=T, p_value, n=n_images, effect=T / (n_images
    * S))`` (the accuracy difference as a fraction) with ``detail``: ``n_seeds``, and the number
    of images where a has more hits (``n_a_better``), b has more (``n_b_better``), or they tie
    (``n_tied``; ties carry no information). No untied image: p = 1. p-values below ~1e-300
    underflow to 0.
    """
    a = _as_hit_matrix(hits_a, "hits_a")
    b = _as_hit_matrix(hits_b, "hits_b")
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"hits_a and hits_b must be non-empty and of equal shape; got {a.shape} "
                         f"and {b.shape}")
    n_images, n_seeds = a.shape
    c = a.sum(axis=1, dtype=np.int64) - b.sum(axis=1, dtype=np.int64)  # [n_images]
    t_obs = int(c.sum())
    detail = {"n_seeds": int(n_seeds), "n_a_better": int(np.sum(c > 0)),
              "n_b_better": int(np.sum(c < 0)), "n_tied": int(np.sum(c == 0))}
    effect = t_obs / (n_images * n_seeds)
    magnitudes = np.abs(c[c != 0])
    if t_obs == 0:
        p = 1.0
    else:
        pmf = _sign_flip_null_pmf(magnitudes)  # [2 M + 1], index j <-> T* = j - M
        m_total = int(magnitudes.sum())
        # The null is symmetric: P(|T*| >= |T|) = 2 P(T* >= |T|) for T != 0 (summing the small
        # upper tail is also the accurate way round).
        p = min(1.0, 2.0 * float(pmf[m_total + abs(t_obs):].sum()))
    return TestResult("sign_flip_exact", float(t_obs), p, int(n_images), effect, detail)


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
    paired per-sample score (e.g. IoU). The samples must be independent (one seed): for several
    seeds per test image use ``sign_flip_test``, or average each image's seeds first.
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
