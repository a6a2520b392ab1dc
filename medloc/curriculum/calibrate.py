"""Calibrate MedLoc-R1's curriculum for a new model and dataset from a probe (docs/beyond.md).

    python -m medloc.curriculum.calibrate --probe PROBE.json [--pilot IOUS.jsonl] --out FILE.yaml
        [--steps T] [--prompts-per-step B] [--compare NAME=NODE.yaml ...] [key=value ...]

The method leaves τ0, τ_target, the step sizes, the window N, the (P, S) table and Δ to the user
(docs/method.md §3). This tool proposes them from what the starting model does on the dataset:

- PROBE.json: ``python -m experiments.sparsity --out``: the starting model's sampled IoUs,
  ``"ious"``: [prompts x G] (G completions per prompt at the run's temperature), with the run's
  ``max_steps``, ``prompts_per_step`` and ``op``;
- IOUS.jsonl (optional): a short pilot run's recorded IoUs (``ious.jsonl`` of any run, the format
  of ``medloc.curriculum.replay``). Without one, the probe's groups, taken B prompts at a time,
  stand in for the steps of a run that has not learnt anything yet (a "pseudo-trajectory").

It writes FILE.yaml (a ``curriculum`` node: the keys of ``conf/curriculum/medloc.yaml``) and,
beside it, FILE.md (for each value: the statistic and the rule that set it, and the replay check)
and FILE.png (the probe's curves with the proposed values). ``key=value`` words set the
calibration's own constants (:class:`CalibrationConfig`, each one ASSUMED and documented there).

The rules (:func:`calibrate`), each a pure function below:

1. τ0 = the highest rung (multiples of ``rung``) at which at most ``start_dead_max`` of the probe's
   groups have no sample with IoU op τ (a binary reward gives those groups no gradient);
2. τ_target = the highest rung at which at least ``target_alive_min`` of the groups still have
   one, capped at ``tau_cap``; never at or below τ0 (then τ0 + one rung; τ0 is held at least one
   rung below the cap);
3. the steps: ``n_raises`` raises from τ0 to τ_target, placed so that each raise removes the same
   share of the probe's hits (the hit rate at the k-th rung is h(τ0)·(h(τ_target)/h(τ0))^(k/K)),
   on a ``step_resolution`` grid; written as piecewise bands (one band per rung);
4. N = round(T · ``window_frac``) within [``window_min``, ``window_max``] for a run of T steps;
5. P, S and Δ where the window statistics of the pilot (or pseudo-trajectory) cross them: at
   τ_x = τ0 + ``cross_frac`` · (τ_target − τ0), P = the ``stat_quantile`` quantile of the window
   hit rate and Δ that of the window margin, so these checks fail on about half the windows at τ_x
   and pass below it (both statistics fall as τ rises). σ does not fall with τ (it peaks where the
   hit rate is near 1/2), so S is the ``stat_quantile`` quantile of σ at the ladder rung in
   [τ0, τ_x] where that quantile is largest: the stability check then holds the noisier windows
   wherever the run stands before τ_x, and never blocks every window at τ0. Each check can be the
   one that binds; the replay in the report counts how often each did.

Guarantees (tests/unit/test_calibrate*.py): τ0 < τ_target always; the same inputs give the same
node; a probe whose IoUs are all at least as high never gets a lower τ0 or τ_target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medloc.curriculum.config import MIN_STEP
from medloc.curriculum.medloc import MedLocConfig, decide, pass_criteria
from medloc.curriculum.replay import ReplayError, read_trajectory, replay
from medloc.curriculum.window import WindowStats, window_statistics
from medloc.rewards import compare

__all__ = [
    "Calibration",
    "CalibrationConfig",
    "CalibrationError",
    "calibrate",
    "check_binding",
    "choose_target",
    "choose_tau0",
    "compare_paths",
    "cross_statistics",
    "dead_fraction",
    "hit_rate",
    "main",
    "pseudo_trajectory",
    "read_probe",
    "rungs",
    "step_ladder",
    "window_size",
]

_EPS = 1e-9  # grid arithmetic slack (0.1 + 0.2 is not 0.3 in floating point)


class CalibrationError(ValueError):
    """A user-facing error of the calibration (bad probe, bad pilot, bad constant)."""


@dataclass
class CalibrationConfig:
    """The calibration's own constants. Each is ASSUMED (docs/beyond.md gives the reasons)."""

    # ASSUMED: τ0 and τ_target are multiples of 0.05: the paper's 0.3 and 0.8 and both embedded
    # hand calibrations (0.1 / 0.5, 0.05 / 0.3) sit on this grid, and a finer one would chase the
    # probe's sampling noise (64 prompts: one group is 1.6% of the dead fraction).
    rung: float = 0.05
    # The paper's τ_target (docs/method.md §3): the calibration never proposes a higher one.
    tau_cap: float = 0.8
    # ASSUMED: at τ0 at most 30% of the probe's groups may be dead (no hit). The embedded Table 1
    # preset starts at τ0 = 0.1, where the stand-in's probe has 12-25% dead groups per twin and
    # the paper's 0.3 would have 34-59%; a dense start is what the curriculum is for.
    start_dead_max: float = 0.30
    # ASSUMED: τ_target is the highest rung at which at least 20% of the groups still get a hit:
    # the stand-in's HAM10000 probe has 20.3% at τ = 0.5, the hand-set target; at 0.75 only 1.6%.
    target_alive_min: float = 0.20
    # ASSUMED: raises from τ0 to τ_target; the paper's ladder 0.3 -> 0.45 -> 0.55 -> 0.65 ->
    # 0.75 -> 0.8 has 5.
    n_raises: int = 5
    # ASSUMED: ladder rungs on a 0.01 grid (also the smallest step).
    step_resolution: float = 0.01
    # ASSUMED: window N = 1/8 of the run's steps: 80 -> 10 (the Table 1 preset), 60 -> 8 (the
    # ablation preset), 500 -> 62, held at the paper's 30 by window_max.
    window_frac: float = 0.125
    window_min: int = 4  # ASSUMED: fewer steps make σ of the step means meaningless
    window_max: int = 30  # the paper's N
    # ASSUMED: the checks cross halfway between τ0 and τ_target: below it they pass, above it the
    # model must improve first. The embedded ablation preset placed P and Δ so that both cross
    # at τ ≈ 0.18 of its 0.05 -> 0.3 (0.52 of the way).
    cross_frac: float = 0.5
    # ASSUMED: P, S and Δ at the median of their window statistic at τ_x: each check then fails on
    # about half of the windows there (the ablation preset put S "near the median σ").
    stat_quantile: float = 0.5
    decimals: int = 2  # P, S and Δ are rounded to this many decimals (the presets' precision)
    # Not calibrated: the paper's choices.
    refresh: str = "semi"
    std_over: str = "step_means"

    def __post_init__(self) -> None:
        def rng(name: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (v > lo if lo_open else v >= lo) and v <= hi)
            if not ok:
                raise CalibrationError(
                    f"calibration.{name}={v!r} must be a number in {'(' if lo_open else '['}{lo}, {hi}]")

        rng("rung", 0.0, 0.5, lo_open=True)
        rng("tau_cap", 0.0, 1.0, lo_open=True)
        if self.tau_cap < 2 * self.rung - _EPS:
            raise CalibrationError(f"calibration.tau_cap={self.tau_cap} must be at least two rungs "
                                   f"(2 x {self.rung}): τ0 and τ_target need one each")
        rng("start_dead_max", 0.0, 1.0)
        rng("target_alive_min", 0.0, 1.0)
        rng("step_resolution", MIN_STEP, 0.5)
        rng("window_frac", 0.0, 1.0, lo_open=True)
        rng("cross_frac", 0.0, 1.0)
        rng("stat_quantile", 0.0, 1.0)
        for name, lo in (("n_raises", 1), ("window_min", 2), ("window_max", 2), ("decimals", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise CalibrationError(f"calibration.{name}={v!r} must be an integer >= {lo}")
        if self.window_max < self.window_min:
            raise CalibrationError(f"calibration.window_max={self.window_max} must be >= "
                                   f"window_min={self.window_min}")


# --------------------------------------------------------------------------- pure rules

def _groups(ious: np.ndarray) -> np.ndarray:
    arr = np.asarray(ious, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise CalibrationError(f"probe IoUs must be [prompts, G] with both >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise CalibrationError("probe IoUs must be numbers in [0, 1]")
    return arr


def dead_fraction(ious: np.ndarray, tau: float, op: str) -> float:
    """Fraction of groups (rows of ``ious`` [B, G]) in which no sample has IoU op τ."""
    hits = compare(_groups(ious), tau, op)  # [B, G]
    return float((~hits.any(axis=1)).mean())


def hit_rate(ious: np.ndarray, tau: float, op: str) -> float:
    """Fraction of all samples with IoU op τ."""
    return float(compare(np.asarray(ious, dtype=np.float64), tau, op).mean())


def rungs(rung: float, cap: float) -> list[float]:
    """The τ grid ``[rung, 2·rung, ..., <= cap]`` (rounded to 6 decimals)."""
    n = math.floor(cap / rung + _EPS)
    return [round(k * rung, 6) for k in range(1, n + 1)]


def choose_tau0(ious: np.ndarray, *, rung: float, tau_cap: float, dead_max: float,
                op: str) -> float:
    """τ0: the highest rung with dead fraction <= ``dead_max``, at most one rung below the cap.

    The lowest rung when even it has more dead groups (the report says so). Monotone: higher IoUs
    give fewer dead groups at every τ, so the set of admissible rungs can only grow upward.
    """
    grid = rungs(rung, tau_cap)[:-1]  # the top rung is left to τ_target
    ok = [t for t in grid if dead_fraction(ious, t, op) <= dead_max + _EPS]
    return ok[-1] if ok else grid[0]


def choose_target(ious: np.ndarray, tau0: float, *, rung: float, tau_cap: float,
                  alive_min: float, op: str) -> float:
    """τ_target: the highest rung (<= cap) where at least ``alive_min`` of the groups have a hit,
    and at least τ0 + one rung."""
    grid = rungs(rung, tau_cap)
    ok = [t for t in grid if 1.0 - dead_fraction(ious, t, op) >= alive_min - _EPS]
    floor = round(tau0 + rung, 6)
    best = ok[-1] if ok else floor
    return min(max(best, floor), grid[-1])


def step_ladder(pooled: np.ndarray, tau0: float, tau_target: float, *, n_raises: int,
                resolution: float, op: str) -> list[float]:
    """τ0 < τ_1 < ... < τ_target: each raise removes the same share of the probe's hits.

    Rung k (1 <= k < K) is the lowest τ on the ``resolution`` grid above the previous rung whose
    hit rate h(τ) is <= h(τ0)·(h(τ_target)/h(τ0))^(k/K). Where the hit curve is flat (or empty at
    τ_target) the rungs are spread evenly in τ instead. Rungs that coincide are merged.
    """
    if not tau0 < tau_target:
        raise CalibrationError(f"step ladder needs tau0 < tau_target, got {tau0} >= {tau_target}")
    h0, ht = hit_rate(pooled, tau0, op), hit_rate(pooled, tau_target, op)
    n_grid = math.floor((tau_target - tau0) / resolution + _EPS)
    grid = [round(tau0 + j * resolution, 6) for j in range(1, n_grid + 1)]
    grid = [t for t in grid if t < tau_target - _EPS]
    ladder = [round(tau0, 6)]
    geometric = h0 > 0 and ht > 0 and ht < h0
    for k in range(1, n_raises):
        if geometric:
            goal = h0 * (ht / h0) ** (k / n_raises)
            pick = next((t for t in grid if t > ladder[-1] + _EPS
                         and hit_rate(pooled, t, op) <= goal + _EPS), None)
        else:
            even = tau0 + (tau_target - tau0) * k / n_raises
            pick = next((t for t in grid if t > ladder[-1] + _EPS and t >= even - _EPS), None)
        if pick is not None:
            ladder.append(pick)
    ladder.append(round(tau_target, 6))
    return ladder


def window_size(steps: int, *, frac: float, lo: int, hi: int) -> int:
    """N = round(steps · frac) within [lo, hi] (Python's round: halves to even, 7.5 -> 8)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CalibrationError(f"steps={steps!r} must be an integer >= 1 (the run's max_steps)")
    return min(max(round(steps * frac), lo), hi)


def pseudo_trajectory(ious: np.ndarray, prompts_per_step: int) -> list[tuple[int, np.ndarray]]:
    """The probe's groups, ``prompts_per_step`` at a time, as steps of a run that has not learnt:
    ``[(step, IoUs [B·G])]``; a remainder of fewer groups is dropped."""
    arr = _groups(ious)
    n = arr.shape[0] // prompts_per_step
    return [(k, arr[k * prompts_per_step:(k + 1) * prompts_per_step].reshape(-1))
            for k in range(n)]


def cross_statistics(trajectory: Sequence[tuple[int, np.ndarray]], window: int, tau: float,
                     op: str, std_over: str) -> list[WindowStats]:
    """The window statistics at ``tau`` of every full sliding window of the trajectory."""
    steps = [np.asarray(x, dtype=np.float64) for _, x in trajectory]
    if len(steps) < window:
        raise CalibrationError(
            f"the trajectory has {len(steps)} steps, fewer than the window N={window}: a longer "
            f"pilot, or a probe with more prompts (>= N x prompts_per_step), is needed")
    return [window_statistics(steps[i - window:i], tau, op, std_over)
            for i in range(window, len(steps) + 1)]


# --------------------------------------------------------------------------- the calibration

@dataclass
class Calibration:
    """The proposed ``curriculum`` node and, per value, the statistic and rule that set it."""

    node: dict[str, Any]
    provenance: list[dict[str, str]] = field(default_factory=list)
    source: str = ""  # "pilot" or "probe pseudo-trajectory"
    tau_cross: float = 0.0
    probe_curve: list[tuple[float, float, float]] = field(default_factory=list)  # (τ, dead, hit)
    warnings: list[str] = field(default_factory=list)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method="linear"))


def calibrate(probe_ious: np.ndarray, *, steps: int, prompts_per_step: int, op: str,
              cfg: CalibrationConfig,
              pilot: Sequence[tuple[int, np.ndarray]] | None = None) -> Calibration:
    """Propose a MedLoc-R1 curriculum from the probe's IoUs [prompts, G] (and a pilot)."""
    ious = _groups(probe_ious)  # [B, G]
    if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) \
            or prompts_per_step < 1:
        raise CalibrationError(f"prompts_per_step={prompts_per_step!r} must be an integer >= 1")
    prov: list[dict[str, str]] = []
    warnings: list[str] = []

    tau0 = choose_tau0(ious, rung=cfg.rung, tau_cap=cfg.tau_cap, dead_max=cfg.start_dead_max, op=op)
    d0 = dead_fraction(ious, tau0, op)
    if d0 > cfg.start_dead_max + _EPS:
        warnings.append(f"even the lowest rung τ = {tau0:g} leaves {d0:.0%} of the probe's groups "
                        f"dead (> start_dead_max {cfg.start_dead_max:g}): the model rarely hits")
    prov.append({"key": "tau0", "value": f"{tau0:g}",
                 "statistic": f"probe dead-group fraction at τ0: {d0:.1%}",
                 "rule": f"highest {cfg.rung:g}-rung with at most {cfg.start_dead_max:.0%} dead "
                         f"groups (start_dead_max), below tau_cap {cfg.tau_cap:g}"})

    target = choose_target(ious, tau0, rung=cfg.rung, tau_cap=cfg.tau_cap,
                           alive_min=cfg.target_alive_min, op=op)
    alive_t = 1.0 - dead_fraction(ious, target, op)
    prov.append({"key": "tau_target", "value": f"{target:g}",
                 "statistic": f"probe groups with a hit at τ_target: {alive_t:.1%}",
                 "rule": f"highest {cfg.rung:g}-rung with at least {cfg.target_alive_min:.0%} of "
                         f"groups hit (target_alive_min), <= tau_cap {cfg.tau_cap:g}, > τ0"})

    ladder = step_ladder(ious.reshape(-1), tau0, target, n_raises=cfg.n_raises,
                         resolution=cfg.step_resolution, op=op)
    bands = [[ladder[i], round(ladder[i + 1] - ladder[i], 6)] for i in range(len(ladder) - 1)]
    deltas = [b[1] for b in bands]
    hits = ", ".join(f"{t:g}: {hit_rate(ious, t, op):.1%}" for t in ladder)
    prov.append({"key": "piecewise_bands", "value": json.dumps(bands),
                 "statistic": f"probe hit rate at each rung: {hits}",
                 "rule": f"{cfg.n_raises} raises (n_raises), each removing the same share of the "
                         f"probe's hits, on a {cfg.step_resolution:g} grid"})
    prov.append({"key": "delta0 / delta_min", "value": f"{deltas[0]:g} / {min(deltas):g}",
                 "statistic": "the ladder's first and smallest step",
                 "rule": "linear/cosine decay (if chosen) start at the first step, floor at the smallest"})

    window = window_size(steps, frac=cfg.window_frac, lo=cfg.window_min, hi=cfg.window_max)
    prov.append({"key": "window", "value": str(window), "statistic": f"run length T = {steps} steps",
                 "rule": f"round(T x {cfg.window_frac:g}) in [{cfg.window_min}, {cfg.window_max}]"})

    if pilot is not None:
        trajectory, source = list(pilot), "pilot"
    else:
        trajectory, source = pseudo_trajectory(ious, prompts_per_step), "probe pseudo-trajectory"
    tau_x = round(tau0 + cfg.cross_frac * (target - tau0), 6)
    stats = cross_statistics(trajectory, window, tau_x, op, cfg.std_over)
    q = cfg.stat_quantile
    p = round(_quantile([s.hit_rate for s in stats], q), cfg.decimals) + 0.0  # + 0.0: no -0.0
    margin = round(_quantile([s.margin for s in stats], q), cfg.decimals) + 0.0
    sigma_at = {t: _quantile([s.std for s in cross_statistics(trajectory, window, t, op,
                                                               cfg.std_over)], q)
                for t in [x for x in ladder if x < tau_x - _EPS] + [tau_x]}
    tau_s = max(sigma_at, key=lambda t: (sigma_at[t], -t))  # the lowest τ on a tie
    s_max = round(sigma_at[tau_s], cfg.decimals) + 0.0
    where = (f"{len(stats)} windows of N={window} of the {source} ({len(trajectory)} steps) at "
             f"τ_x = {tau_x:g} (cross_frac {cfg.cross_frac:g})")
    rule = f"quantile {q:g} (stat_quantile), rounded to {cfg.decimals} decimals"
    prov.append({"key": "P", "value": f"{p:g}", "statistic": f"window hit rate: {where}",
                 "rule": rule})
    prov.append({"key": "S", "value": f"{s_max:g}",
                 "statistic": "window σ of step hit rates, quantile per rung: "
                              + ", ".join(f"{t:g}: {v:.3f}" for t, v in sigma_at.items()),
                 "rule": f"the largest of these (at τ = {tau_s:g}), {rule}"})
    prov.append({"key": "delta (Δ)", "value": f"{margin:g}",
                 "statistic": f"window margin m̄ = mean IoU − τ: {where}", "rule": rule})

    node: dict[str, Any] = {
        "schedule": "medloc", "window": window, "refresh": cfg.refresh, "step": "piecewise",
        "tau0": float(tau0), "tau_target": float(target), "delta": float(margin),
        "delta0": float(deltas[0]), "delta_min": float(min(deltas)),
        "check_reward": True, "check_stability": True, "check_margin": True,
        "std_over": cfg.std_over, "pass_table": [[0.0, float(p), float(s_max)]],
        "piecewise_bands": bands, "op": op,
    }
    try:
        MedLocConfig(**node)  # the node must be a valid MedLoc-R1 curriculum
    except ValueError as err:  # pragma: no cover - the rules above keep every value in range
        raise CalibrationError(f"the proposed curriculum is invalid: {err}") from None
    curve = [(t, dead_fraction(ious, t, op), hit_rate(ious, t, op))
             for t in [round(0.01 * k, 2) for k in range(101)]]
    return Calibration(node, prov, source, tau_x, curve, warnings)


# --------------------------------------------------------------------------- replay checks

def check_binding(trajectory: Sequence[tuple[int, np.ndarray]], node: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """Replay ``node`` on the trajectory; per full window, which checks failed.

    Returns ``raises``, ``windows`` (decisions taken on a full window), ``failed`` (per check: on
    how many windows it failed) and ``sole`` (per check: on how many windows it was the only one
    that failed, i.e. it alone held a raise), and the τ path.
    """
    cfg = MedLocConfig(**{k: v for k, v in node.items()})
    rows = replay(list(trajectory), cfg)
    failed = {"reward": 0, "stability": 0, "margin": 0}
    sole = dict(failed)
    windows = 0
    for r in rows:
        if r["hit_rate"] is None:
            continue
        windows += 1
        p, s = pass_criteria(r["tau"], cfg.pass_table)
        d = decide(WindowStats(r["hit_rate"], r["std"], r["margin"]), p=p, s=s,
                   margin_delta=cfg.delta, check_reward=True, check_stability=True,
                   check_margin=True)
        fails = [name for name, ok in (("reward", d.pass_reward), ("stability", d.pass_stability),
                                       ("margin", d.pass_margin)) if not ok]
        for name in fails:
            failed[name] += 1
        if len(fails) == 1:
            sole[fails[0]] += 1
    return {"raises": sum(r["raised"] for r in rows), "windows": windows, "failed": failed,
            "sole": sole, "taus": [r["tau"] for r in rows], "steps": [r["step"] for r in rows]}


def compare_paths(trajectory: Sequence[tuple[int, np.ndarray]], a: Mapping[str, Any],
                  b: Mapping[str, Any]) -> dict[str, Any]:
    """Replay two curriculum nodes on the same IoUs: raises, raise steps and final τ of each, and
    the first step whose decision differs (None if none)."""
    from medloc.curriculum import schedule_config

    out: dict[str, Any] = {}
    paths = []
    for name, node in (("a", a), ("b", b)):
        rows = replay(list(trajectory), schedule_config(dict(node)))
        raised = [r["step"] for r in rows if r["raised"]]
        final = rows[-1]["tau"]
        taus = [r["tau"] for r in rows]
        out[name] = {"raises": len(raised), "raise_steps": raised, "tau_path": taus,
                     "first_tau": taus[0], "last_tau": final}
        paths.append(rows)
    first = None
    for ra, rb in zip(*paths):
        if ra["raised"] != rb["raised"]:
            first = ra["step"]
            break
    out["first_difference"] = first
    return out


# --------------------------------------------------------------------------- files and CLI

def read_probe(path: str | Path) -> dict[str, Any]:
    """The probe JSON of ``experiments.sparsity --out`` with its raw ``ious`` [prompts, G]."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CalibrationError(f"cannot read probe {path}: {err}") from None
    if not isinstance(obj, dict) or "ious" not in obj:
        raise CalibrationError(f"{path}: no 'ious' field: the probe must be written by "
                               "`python -m experiments.sparsity --out` (it records [prompts x G] IoUs)")
    try:
        obj["ious"] = _groups(np.asarray(obj["ious"], dtype=np.float64))
    except (ValueError, TypeError) as err:
        raise CalibrationError(f"{path}: field 'ious': {err}") from None
    return obj


def _to_yaml(node: Mapping[str, Any], header: str) -> str:
    from omegaconf import OmegaConf

    return header + OmegaConf.to_yaml(OmegaConf.create(dict(node)))


def overrides_for(node: Mapping[str, Any]) -> list[str]:
    """``++curriculum.KEY=VALUE`` command-line words that set every key of ``node`` (Hydra syntax;
    ``++`` sets a key whether or not the composed curriculum node already holds it)."""
    words = []
    for k, v in node.items():
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            text = json.dumps(v).replace(" ", "")
        elif isinstance(v, str):
            text = f"'{v}'"
        else:
            text = repr(float(v)) if isinstance(v, float) else str(v)
        words.append(f"++curriculum.{k}={text}")
    return words


def _report(cal: Calibration, binding: dict[str, Any], comparisons: list[tuple[str, str, dict]],
            probe_path: str, pilot_path: str | None, cfg: CalibrationConfig, png_name: str) -> str:
    lines = ["# Curriculum calibration", "",
             f"Probe: `{probe_path}`" + (f"; pilot: `{pilot_path}`" if pilot_path else
                                         "; no pilot (the probe's pseudo-trajectory stands in)"),
             "", "| value | set to | statistic | rule |", "|---|---|---|---|"]
    lines += [f"| {p['key']} | {p['value']} | {p['statistic']} | {p['rule']} |" for p in cal.provenance]
    lines += ["", "Constants (each ASSUMED, medloc/curriculum/calibrate.py): "
              + ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)), ""]
    if cal.warnings:
        lines += ["**Warnings:**", *[f"- {w}" for w in cal.warnings], ""]
    lines += [f"**Replay check** on the {cal.source}: {binding['raises']} raise(s) over "
              f"{len(binding['steps'])} steps ({binding['windows']} decisions on a full window). "
              "Windows on which each check failed (and on which it alone held the raise): "
              + ", ".join(f"{k} {binding['failed'][k]} ({binding['sole'][k]})"
                          for k in ("reward", "stability", "margin")) + ".", ""]
    if comparisons:
        lines += ["**Against other curricula, replayed on the same recorded IoUs:**", "",
                  "| trajectory | curriculum | raises | raise steps | τ path end | first differing decision |",
                  "|---|---|---|---|---|---|"]
        for traj, name, c in comparisons:
            lines.append(f"| {traj} | calibrated | {c['a']['raises']} | {c['a']['raise_steps']} | "
                         f"{c['a']['first_tau']:g} → {c['a']['last_tau']:g} | |")
            first = "none" if c["first_difference"] is None else f"step {c['first_difference']}"
            lines.append(f"| {traj} | {name} | {c['b']['raises']} | {c['b']['raise_steps']} | "
                         f"{c['b']['first_tau']:g} → {c['b']['last_tau']:g} | {first} |")
        lines.append("")
    lines += [f"![probe curves and proposed values]({png_name})", ""]
    return "\n".join(lines)


def _plot(cal: Calibration, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medloc.atomic import atomic_write_with

    taus = [c[0] for c in cal.probe_curve]
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.plot(taus, [c[1] for c in cal.probe_curve], label="dead-group fraction (probe)")
    ax.plot(taus, [c[2] for c in cal.probe_curve], label="hit rate (probe)")
    for b in cal.node["piecewise_bands"]:
        ax.axvline(b[0], color="grey", linestyle=":", linewidth=0.8)
    ax.axvline(cal.node["tau_target"], color="black", linestyle="--", linewidth=0.9,
               label="τ_target (dotted: ladder rungs)")
    ax.axvline(cal.tau_cross, color="tab:red", linestyle="-.", linewidth=0.9, label="τ_x (checks cross)")
    ax.set_xlabel("IoU threshold τ")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    try:
        atomic_write_with(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _read_node(path: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, ValueError) as err:
        raise CalibrationError(f"cannot read curriculum node {path}: {err}") from None
    if not isinstance(node, dict):
        raise CalibrationError(f"{path}: expected a mapping of curriculum keys")
    return node


def main(argv: list[str] | None = None) -> int:
    from medloc.atomic import atomic_write_files
    from medloc.logging import console

    ap = argparse.ArgumentParser(prog="python -m medloc.curriculum.calibrate",
                                 description="Propose a MedLoc-R1 curriculum from a probe (and a pilot).")
    ap.add_argument("--probe", required=True, help="JSON of `python -m experiments.sparsity --out`")
    ap.add_argument("--pilot", default=None, help="ious.jsonl of a short pilot run (optional)")
    ap.add_argument("--out", required=True, help="the curriculum node (YAML); .md and .png beside it")
    ap.add_argument("--steps", type=int, default=None, help="the run's max_steps (default: the probe's)")
    ap.add_argument("--prompts-per-step", type=int, default=None,
                    help="prompts per step (default: the probe's)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=NODE.yaml",
                    help="also replay this curriculum node on each --trajectory")
    ap.add_argument("--trajectory", action="append", default=[],
                    help="recorded ious.jsonl for --compare (default: the pilot)")
    ap.add_argument("--print-overrides", action="store_true",
                    help="print the ++curriculum.KEY=VALUE words that load the node into medloc.train")
    ap.add_argument("constants", nargs="*", help="calibration constants as key=value")
    args = ap.parse_args(argv)
    try:
        values: dict[str, Any] = {}
        hints = {f.name: f.type for f in dataclasses.fields(CalibrationConfig)}
        for word in args.constants:
            key, sep, raw = word.partition("=")
            if not sep or key not in hints:
                raise CalibrationError(f"constant {word!r}: expected key=value with key one of {sorted(hints)}")
            values[key] = raw if hints[key] == "str" else (int(raw) if hints[key] == "int" else float(raw))
        cfg = CalibrationConfig(**values)
        probe = read_probe(args.probe)
        steps = args.steps if args.steps is not None else probe.get("max_steps")
        pps = args.prompts_per_step if args.prompts_per_step is not None else probe.get("prompts_per_step")
        if steps is None or pps is None:
            raise CalibrationError(f"{args.probe} records no max_steps / prompts_per_step: pass "
                                   "--steps and --prompts-per-step")
        op = str(probe.get("op", ">="))
        pilot = read_trajectory(args.pilot) if args.pilot else None
        cal = calibrate(probe["ious"], steps=int(steps), prompts_per_step=int(pps), op=op, cfg=cfg,
                        pilot=pilot)
        check_on = pilot if pilot is not None else pseudo_trajectory(probe["ious"], int(pps))
        binding = check_binding(check_on, cal.node)
        comparisons = []
        trajs = args.trajectory or ([args.pilot] if args.pilot else [])
        for spec in args.compare:
            name, sep, path = spec.partition("=")
            if not sep:
                raise CalibrationError(f"--compare {spec!r}: expected NAME=NODE.yaml")
            other = _read_node(path)
            for t in trajs:
                comparisons.append((t, name, compare_paths(read_trajectory(t), cal.node, other)))
        out = Path(args.out)
        header = (f"# Curriculum calibrated by `python -m medloc.curriculum.calibrate` from "
                  f"{args.probe}" + (f" and {args.pilot}" if args.pilot else "")
                  + f"; the reasons: {out.with_suffix('.md').name}\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        _plot(cal, out.with_suffix(".png"))
        atomic_write_files({
            out: _to_yaml(cal.node, header),
            out.with_suffix(".md"): _report(cal, binding, comparisons, args.probe, args.pilot, cfg,
                                            out.with_suffix(".png").name),
        })
    except (CalibrationError, ReplayError) as err:
        console(f"calibrate: error: {err}", err=True)
        return 2
    if args.print_overrides:
        console(" ".join(overrides_for(cal.node)))
    else:
        console(f"calibrate: wrote {out} (τ0 {cal.node['tau0']:g} -> τ_target "
                f"{cal.node['tau_target']:g}, N {cal.node['window']}, P {cal.node['pass_table'][0][1]:g}, "
                f"S {cal.node['pass_table'][0][2]:g}, Δ {cal.node['delta']:g}) and its report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
