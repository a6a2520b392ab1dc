"""The MedLoc-R1 scheduler (docs/method.md §3), hand-worked:

- window statistics (hit rate, population std of per-step means or of all rewards, margin);
- (P, S) lookup and the three step-size policies, incl. the 6-decimal rounding of τ;
- the exact piecewise trajectory 0.30 -> 0.45 -> 0.55 -> 0.65 -> 0.75 -> 0.80 with its raise
  steps on a constructed IoU stream under the paper's defaults (N = 30, semi refresh);
- the exact linear and cosine trajectories;
- each check's ablation changes exactly the decisions it should;
- each refresh variant keeps exactly the right window entries;
- metrics, raise history and exact state round-trip.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medloc.curriculum import FixedConfig, MedLocConfig, MedLocScheduler, build_scheduler
from medloc.curriculum.medloc import (
    cosine_step,
    decide,
    linear_step,
    next_tau,
    pass_criteria,
    piecewise_step,
)
from medloc.curriculum.window import WindowStats, refresh_keep_count, window_statistics

TABLE = MedLocConfig().pass_table
BANDS = MedLocConfig().piecewise_bands


def make(total_steps: int = 1000, **overrides) -> MedLocScheduler:
    sched = build_scheduler(MedLocConfig(**overrides), total_steps)
    assert isinstance(sched, MedLocScheduler)
    return sched


def feed(sched, stream, start: int = 0) -> list[dict]:
    return [sched.observe(start + k, ious) for k, ious in enumerate(stream)]


# ----------------------------------------------------------------------------- pure pieces
def test_window_statistics_hand_worked():
    steps = [np.array([0.9, 0.7]), np.array([0.8, 0.2]), np.array([0.6, 0.6]), np.array([0.5, 0.7])]
    s = window_statistics(steps, tau=0.3, op=">=")
    # per-step hits at τ=0.3: [1, 1/2, 1, 1] -> r̄ = 3.5/4 = 0.875
    # population std: deviations .125 -.375 .125 .125 -> squares sum .1875 -> /4 = .046875
    # per-step mean IoUs .8 .5 .6 .6 -> 2.5/4 = .625 -> m̄ = .625 - .3 = .325
    assert s.hit_rate == pytest.approx(0.875, abs=1e-12)
    assert s.std == pytest.approx(math.sqrt(0.046875), abs=1e-12)
    assert s.margin == pytest.approx(0.325, abs=1e-12)
    # over all 8 rewards: 7 ones and 1 zero -> p = 7/8, std = sqrt(p(1-p)) = sqrt(7/64)
    s_all = window_statistics(steps, tau=0.3, op=">=", std_over="all_rewards")
    assert s_all.std == pytest.approx(math.sqrt(7 / 64), abs=1e-12)
    assert s_all.hit_rate == s.hit_rate


def test_window_statistics_mean_of_step_means_with_unequal_steps():
    # step A: 1 sample hit (1.0); step B: 3 samples, 1 hit (1/3) -> r̄ = (1 + 1/3)/2 = 2/3,
    # not the pooled 2/4 (the paper's formula averages per-step means)
    s = window_statistics([np.array([0.9]), np.array([0.9, 0.1, 0.1])], tau=0.5, op=">=")
    assert s.hit_rate == pytest.approx(2 / 3, abs=1e-12)
    # mean IoUs 0.9 and 1.1/3 -> (0.9 + 0.366667)/2 = 0.633333; m̄ = 0.133333
    assert s.margin == pytest.approx((0.9 + 1.1 / 3) / 2 - 0.5, abs=1e-12)


def test_window_statistics_operator():
    steps = [np.array([0.5, 0.5, 0.4, 0.6])]
    assert window_statistics(steps, 0.5, ">=").hit_rate == 0.75  # .5 .5 .6 hit
    assert window_statistics(steps, 0.5, ">").hit_rate == 0.25  # only .6 hits


def test_pass_criteria_table():
    # rows [edge, P, S]: τ < .60 -> (.80, .20); .60 <= τ < .75 -> (.75, .35); τ >= .75 -> (.55, .40)
    assert pass_criteria(0.3, TABLE) == (0.80, 0.20)
    assert pass_criteria(0.599999, TABLE) == (0.80, 0.20)
    assert pass_criteria(0.6, TABLE) == (0.75, 0.35)
    assert pass_criteria(0.75, TABLE) == (0.55, 0.40)
    assert pass_criteria(0.8, TABLE) == (0.55, 0.40)


def test_piecewise_steps_and_rounding():
    # bands: τ < .45 -> .15; .45 <= τ < .70 -> .10; τ >= .70 -> .05
    assert [piecewise_step(t, BANDS) for t in (0.3, 0.449999, 0.45, 0.65, 0.7, 0.75)] == \
        [0.15, 0.15, 0.10, 0.10, 0.05, 0.05]
    # 0.3 + 0.15 is 0.44999999999999996 in binary floating point: unrounded it would sit in the
    # first band and get another 0.15 step; next_tau rounds to 6 decimals -> exactly 0.45
    assert 0.3 + 0.15 != 0.45
    assert next_tau(0.3, 0.15, 0.8) == 0.45
    assert piecewise_step(next_tau(0.3, 0.15, 0.8), BANDS) == 0.10
    assert next_tau(0.75, 0.10, 0.8) == 0.8  # capped at τ_target


def test_linear_and_cosine_step_formulas():
    kw = {"tau0": 0.3, "tau_target": 0.8, "delta0": 0.15, "delta_min": 0.02}
    # linear: .15 * (1 - (.45 - .3)/.5) = .15 * .7 = .105
    assert linear_step(0.45, **kw) == pytest.approx(0.105, abs=1e-15)
    # near the target the decay would be .15 * (1 - .48/.5) = .006 -> floored to δ_min = .02
    assert linear_step(0.78, **kw) == 0.02
    # cosine at τ0: .15 * ½(1 + cos 0) = .15; at .45: .075 * (1 + cos(.3π)) = .075 * 1.5877853 = .1190839
    assert cosine_step(0.3, **kw) == pytest.approx(0.15, abs=1e-15)
    assert cosine_step(0.45, **kw) == pytest.approx(0.1190839, abs=1e-7)
    assert cosine_step(0.79, **kw) == 0.02


def test_decide_boundaries_and_switches():
    # exactly on every bound passes (>= P, <= S, >= Δ); 0.75 - 0.65 = 0.09999999999999998 in
    # floating point still counts as the margin 0.10 (statistics compared at 9 decimals)
    on = WindowStats(hit_rate=0.8, std=0.2, margin=0.75 - 0.65)
    d = decide(on, p=0.8, s=0.2, margin_delta=0.1, check_reward=True, check_stability=True,
               check_margin=True)
    assert (d.pass_reward, d.pass_stability, d.pass_margin, d.raise_tau) == (True, True, True, True)
    off = WindowStats(hit_rate=0.79, std=0.21, margin=0.09)
    d = decide(off, p=0.8, s=0.2, margin_delta=0.1, check_reward=True, check_stability=True,
               check_margin=True)
    assert (d.pass_reward, d.pass_stability, d.pass_margin, d.raise_tau) == (False, False, False, False)
    d = decide(off, p=0.8, s=0.2, margin_delta=0.1, check_reward=False, check_stability=False,
               check_margin=False)
    assert d.raise_tau  # all checks off: a full window always raises


# ----------------------------------------------------------------------------- exact trajectories
def step_ious(k: int) -> list[float]:
    """Constructed stream: 10 samples per step, 9 at IoU v and 1 miss (IoU 0) -> step mean 0.9·v.

    Phase A, steps 0-39:  v = 0.50 (step mean IoU 0.450)
    Phase B, steps 40-79: v = 0.75 (step mean IoU 0.675)
    Phase C, steps 80-  : v = 0.95 (step mean IoU 0.855)
    """
    v = 0.50 if k < 40 else (0.75 if k < 80 else 0.95)
    return [v] * 9 + [0.0]


def test_exact_piecewise_trajectory_on_constructed_stream():
    """Defaults: N = 30, semi refresh (keep newest 15), P/S table and Δ = 0.10 of docs/method.md.

    τ=0.30: window first full at step 29 (steps 0-29, all A): r̄ = 0.9 >= P 0.80, σ = 0 <= 0.20,
            m̄ = 0.45 - 0.30 = 0.15 >= 0.10 -> RAISE at 29 to 0.30 + 0.15 = 0.45; keep steps 15-29.
    τ=0.45: full again at step 44 (steps 15-44). A and B both hit at 0.45 (r̄ = 0.9, σ = 0).
            With b B-steps among 30: mean IoU = 0.45 + (0.675 - 0.45)·b/30 = 0.45 + 0.0075·b,
            m̄ = 0.0075·b >= 0.10 needs b >= 13.3 -> b = 14 -> window steps 24-53 -> RAISE at 53
            (m̄ = 0.105; at 52, b = 13: 0.0975) to 0.45 + 0.10 = 0.55; keep steps 39-53 (1 A, 14 B).
    τ=0.55: full at step 68 (steps 39-68: 1 A, 29 B). A misses at 0.55 (0.5 < 0.55):
            r̄ = 29·0.9/30 = 0.87 >= 0.80; σ of {29 × 0.9, 1 × 0}: mean .87, variance
            (29·.03² + .87²)/30 = (.0261 + .7569)/30 = .0261 -> σ = .16155 <= 0.20;
            m̄ = (0.45 + 29·0.675)/30 - 0.55 = 20.025/30 - 0.55 = 0.1175 -> RAISE at 68 to 0.65;
            keep steps 54-68 (all B).
    τ=0.65: full at step 83; B alone gives m̄ = 0.675 - 0.65 = 0.025. With c C-steps:
            m̄ = 0.025 + (0.855 - 0.675)·c/30 = 0.025 + 0.006·c >= 0.10 needs c >= 12.5 -> c = 13
            -> window steps 63-92 -> RAISE at 92 (m̄ = 0.103; P(0.65) = 0.75 <= 0.9) to 0.75
            (0.65 is still in the 0.10 band); keep steps 78-92 (2 B, 13 C).
    τ=0.75: full at 107. B hits (0.75 >= 0.75), so r̄ = 0.9 >= P(0.75) = 0.55, σ = 0;
            with b B-steps m̄ = 0.855 - 0.006·b - 0.75 = 0.105 - 0.006·b >= 0.10 needs b = 0
            -> window steps 80-109 -> RAISE at 109 (m̄ = 0.105) to min(0.75 + 0.05, 0.8) = 0.8.
    τ=0.80 = τ_target: no further raise.
    """
    sched = make(total_steps=140)
    metrics = feed(sched, [step_ious(k) for k in range(140)])
    hist = sched.history
    assert [r.step for r in hist] == [29, 53, 68, 92, 109]
    assert [r.old_tau for r in hist] == [0.3, 0.45, 0.55, 0.65, 0.75]
    assert [r.new_tau for r in hist] == [0.45, 0.55, 0.65, 0.75, 0.8]  # exact after rounding
    np.testing.assert_allclose([r.hit_rate for r in hist], [0.9, 0.9, 0.87, 0.9, 0.9], atol=1e-12)
    np.testing.assert_allclose([r.std for r in hist], [0, 0, math.sqrt(0.0261), 0, 0], atol=1e-12)
    np.testing.assert_allclose([r.margin for r in hist], [0.15, 0.105, 0.1175, 0.103, 0.105],
                               atol=1e-12)
    assert sched.tau == 0.8
    # τ used per step: 0.3 for steps 0-29, 0.45 for 30-53, ...
    taus = [m["curriculum/tau"] for m in metrics]
    expected = [0.3] * 30 + [0.45] * 24 + [0.55] * 15 + [0.65] * 24 + [0.75] * 17 + [0.8] * 30
    assert taus == expected
    # one step before each raise the margin check was the one failing (b = 13, c = 12, b = 1)
    assert metrics[52]["curriculum/window_margin"] == pytest.approx(0.0975, abs=1e-12)
    assert metrics[91]["curriculum/window_margin"] == pytest.approx(0.097, abs=1e-12)
    assert metrics[108]["curriculum/window_margin"] == pytest.approx(0.099, abs=1e-12)
    assert metrics[52]["curriculum/pass_margin"] == 0.0
    assert metrics[52]["curriculum/pass_reward"] == 1.0
    # raised flags and counts
    assert [k for k, m in enumerate(metrics) if m["curriculum/raised"]] == [29, 53, 68, 92, 109]
    assert metrics[-1]["curriculum/raises"] == 5.0
    # tau_next is the next step's τ (the raise's new τ at a raise step, the same τ otherwise)
    assert [m["curriculum/tau_next"] for m in metrics[:-1]] == taus[1:]
    assert metrics[-1]["curriculum/tau_next"] == sched.tau == 0.8


def test_window_stats_absent_until_full():
    sched = make(window=30)
    m = feed(sched, [step_ious(k) for k in range(30)])
    for k in range(29):
        assert "curriculum/window_hit_rate" not in m[k]
        assert "curriculum/window_std" not in m[k] and "curriculum/window_margin" not in m[k]
        assert m[k]["curriculum/tau"] == 0.3 and m[k]["curriculum/raised"] == 0.0
    assert m[29]["curriculum/window_hit_rate"] == 0.9


def constant_stream(n: int, iou: float = 0.95, per_step: int = 3) -> list[list[float]]:
    return [[iou] * per_step for _ in range(n)]


def test_exact_linear_trajectory():
    """IoU 0.95 everywhere passes every check (r̄ = 1, σ = 0, m̄ = 0.95 - τ >= 0.15), so with N = 4
    and semi refresh (keep 2) a raise happens at steps 3, 5, 7, ... and τ follows δ alone.

    δ(τ) = max(0.15·(1 - (τ - 0.3)/0.5), 0.02) = max(0.24 - 0.3·τ, 0.02):
      0.3      + 0.15                       = 0.45
      0.45     + 0.24 - 0.135     = 0.105   -> 0.555
      0.555    + 0.24 - 0.1665    = 0.0735  -> 0.6285
      0.6285   + 0.24 - 0.18855   = 0.05145 -> 0.67995
      0.67995  + 0.24 - 0.203985  = 0.036015 -> 0.715965
      0.715965 + 0.24 - 0.2147895 = 0.0252105 -> 0.7411755, a tie at the 7th decimal; the binary
               sum lies just below it, so it rounds to 0.741175
      0.741175: 0.24 - 0.2223525 = 0.0176475 < 0.02 -> floor 0.02 -> 0.761175 -> 0.781175
      0.781175 + 0.02 = 0.801175 -> capped at 0.8
    """
    sched = make(window=4, step="linear")
    feed(sched, constant_stream(40))
    assert [r.new_tau for r in sched.history] == pytest.approx(
        [0.45, 0.555, 0.6285, 0.67995, 0.715965, 0.741175, 0.761175, 0.781175, 0.8], abs=1e-12)
    assert [r.step for r in sched.history] == [3, 5, 7, 9, 11, 13, 15, 17, 19]


def test_exact_cosine_trajectory():
    """Same stream; δ(τ) = max(0.075·(1 + cos(π·(τ - 0.3)/0.5)), 0.02):
      0.3:      cos 0            =  1         -> δ 0.15      -> 0.45
      0.45:     cos(0.3π)        =  0.5877853 -> δ 0.1190839 -> 0.5690839 -> 0.569084
      0.569084: cos(0.538168π)   = -0.1196212 -> δ 0.0660284 -> 0.6351124 -> 0.635112
      0.635112: cos(0.670224π)   = -0.5096470 -> δ 0.0367765 -> 0.6718885 (…847) -> 0.671888
      0.671888: cos(0.743776π)   = -0.6931462 -> δ 0.0230140 -> 0.6949020 -> 0.694902
      0.694902: cos(0.789804π)   = -0.7897775 -> 0.075·0.2102225 = 0.0157667 < 0.02 -> 0.714902
      then +0.02 per raise: 0.734902, 0.754902, 0.774902, 0.794902, then capped at 0.8
    """
    sched = make(window=4, step="cosine")
    feed(sched, constant_stream(40))
    assert [r.new_tau for r in sched.history] == pytest.approx(
        [0.45, 0.569084, 0.635112, 0.671888, 0.694902, 0.714902, 0.734902, 0.754902, 0.774902,
         0.794902, 0.8], abs=1e-12)


def test_piecewise_trajectory_on_constant_stream_every_full_window():
    # N = 4, semi keeps 2: raises at 3, then every 2 steps: 5, 7, 9, 11
    sched = make(window=4)
    feed(sched, constant_stream(20))
    assert [(r.step, r.new_tau) for r in sched.history] == [
        (3, 0.45), (5, 0.55), (7, 0.65), (9, 0.75), (11, 0.8)]


# ----------------------------------------------------------------------------- criteria ablation
# Window N = 4 at τ0 = 0.3, where P = 0.80, S = 0.20, Δ = 0.10. Each stream fails exactly one check.
FAILS_REWARD = [[0.9] * 7 + [0.0] * 3] * 4
# per-step hit 0.7 -> r̄ = 0.7 < 0.8 (fail); σ = 0 (pass); mean IoU 0.63 -> m̄ = 0.33 (pass)
FAILS_STABILITY = [[0.9] * 5, [0.9] * 5, [0.9] * 5, [0.9] + [0.0] * 4]
# per-step hits [1, 1, 1, 0.2] -> r̄ = 3.2/4 = 0.8 (pass, on the bound);
# σ: deviations .2 .2 .2 -.6 -> (3·.04 + .36)/4 = .12 -> σ = .3464 > .2 (fail);
# mean IoUs .9 .9 .9 .18 -> 2.88/4 = .72 -> m̄ = .42 (pass)
FAILS_MARGIN = [[0.35] * 5] * 4
# r̄ = 1 (pass), σ = 0 (pass), m̄ = 0.35 - 0.30 = 0.05 < 0.10 (fail)

CASES = {"reward": FAILS_REWARD, "stability": FAILS_STABILITY, "margin": FAILS_MARGIN}


@pytest.mark.parametrize("failing", ["reward", "stability", "margin"])
@pytest.mark.parametrize(
    "checks",
    [
        (True, True, True),  # full criteria
        (False, True, True),  # w/o reward check
        (True, False, True),  # w/o stability check
        (True, True, False),  # w/o margin check
        (True, False, False),  # reward check only
    ],
    ids=["full", "no_reward", "no_stability", "no_margin", "reward_only"],
)
def test_each_check_ablation_changes_exactly_its_decisions(failing, checks):
    check_reward, check_stability, check_margin = checks
    enabled = {"reward": check_reward, "stability": check_stability, "margin": check_margin}
    sched = make(window=4, check_reward=check_reward, check_stability=check_stability,
                 check_margin=check_margin)
    m = feed(sched, CASES[failing])[-1]
    # the raise happens iff the one failing check is switched off
    assert bool(m["curriculum/raised"]) == (not enabled[failing])
    assert sched.tau == (0.3 if enabled[failing] else 0.45)
    # each check's outcome is reported regardless of the switches
    assert {k: m[f"curriculum/pass_{k}"] for k in CASES} == {k: float(k != failing) for k in CASES}


# ----------------------------------------------------------------------------- window refresh
def test_refresh_keep_counts():
    # N = 30: semi keeps 15, quarter drops 7 (keeps 23), full keeps 0, none keeps 30
    assert [refresh_keep_count(30, 30, m) for m in ("semi", "quarter", "full", "none")] == [15, 23, 0, 30]
    # odd N = 5: semi keeps 5//2 = 2; quarter drops 5//4 = 1 (keeps 4)
    assert [refresh_keep_count(5, 5, m) for m in ("semi", "quarter", "full", "none")] == [2, 4, 0, 5]
    with pytest.raises(ValueError, match="'half'"):
        refresh_keep_count(5, 5, "half")


@pytest.mark.parametrize(
    ("refresh", "kept_steps", "next_raise"),
    [
        # N = 8, first raise at step 7 (first full window, all checks pass)
        ("semi", [4, 5, 6, 7], 11),  # keep newest 8//2 = 4; 4 new steps refill -> step 11
        ("quarter", [2, 3, 4, 5, 6, 7], 9),  # drop oldest 8//4 = 2; 2 new steps -> step 9
        ("full", [], 15),  # drop all; 8 new steps -> step 15
        ("none", [0, 1, 2, 3, 4, 5, 6, 7], 8),  # still full: decides again at step 8
    ],
)
def test_refresh_variants_keep_exactly_the_right_entries(refresh, kept_steps, next_raise):
    # step k contributes the distinguishable IoUs [0.9 + k/1000] * 2 (always passes every check)
    stream = [[0.9 + k / 1000] * 2 for k in range(20)]
    sched = make(window=8, refresh=refresh)
    feed(sched, stream[:8])
    assert sched.history[0].step == 7
    kept = [round((e[0] - 0.9) * 1000) for e in sched.window.entries]
    assert kept == kept_steps
    feed(sched, stream[8:], start=8)
    assert sched.history[1].step == next_raise


def test_kept_entries_are_reread_under_the_new_tau():
    # N = 4. Steps with IoU 0.5 pass at τ = 0.3 (m̄ = 0.2) -> raise at step 3 to 0.45; keep 2.
    # At step 5 the window is [0.5, 0.5, 0.5, 0.5] read under τ = 0.45: r̄ = 1 but
    # m̄ = 0.5 - 0.45 = 0.05 < 0.10 -> no raise (the old entries are judged by the new τ).
    sched = make(window=4)
    m = feed(sched, [[0.5] * 4] * 6)
    assert [r.step for r in sched.history] == [3]
    assert m[5]["curriculum/window_margin"] == pytest.approx(0.05, abs=1e-12)
    assert m[5]["curriculum/tau"] == 0.45


# ----------------------------------------------------------------------------- interface & state
def test_reward_interface_and_step_order():
    sched = make()
    assert (sched.op, sched.tau, sched.next_step) == (">=", 0.3, 0)
    with pytest.raises(ValueError, match="expected step 0, got 1"):
        sched.observe(1, [0.5])
    sched.observe(0, [0.5])
    with pytest.raises(ValueError, match="expected step 1, got 0"):
        sched.observe(0, [0.5])
    with pytest.raises(ValueError, match="step 1: IoU #1 = 1.5 is not a number in \\[0, 1\\]"):
        sched.observe(1, [0.5, 1.5])
    with pytest.raises(ValueError, match="at least one IoU"):
        sched.observe(1, [])


def test_state_dict_is_json_and_restores_exactly_mid_stream():
    stream = [step_ious(k) for k in range(140)]
    full = make(total_steps=140)
    full_metrics = feed(full, stream)

    first = make(total_steps=140)
    feed(first, stream[:60])  # mid-stream: τ = 0.55, window partly refilled (steps 39-59)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["tau"] == 0.55 and len(state["tracker"]["entries"]) == 21
    assert [r["step"] for r in state["history"]] == [29, 53]
    resumed = make(total_steps=140)
    resumed.load_state_dict(state)
    assert resumed.tau == first.tau and resumed.next_step == 60
    rest = feed(resumed, stream[60:], start=60)
    assert rest == full_metrics[60:]
    assert resumed.history == full.history


def test_load_state_rejects_other_schedule_or_window():
    state = make(window=4).state_dict()
    with pytest.raises(ValueError, match="window=4"):
        make(window=5).load_state_dict(state)
    with pytest.raises(ValueError, match="'medloc' scheduler state into a 'fixed'"):
        build_scheduler(FixedConfig(), 10).load_state_dict(state)
