"""medloc.rewards, beyond the paper (docs/beyond.md): ``hybrid`` 1[IoU op τ] + λ·IoU and ``band``
(0 at or below max(τ − w, 0), 1 at τ, linear between), by hand at, just below and just above each
edge; τ taken from a schedule; parse failures (IoU 0 / NaN) and the format reward as for binary."""

from __future__ import annotations

import numpy as np
import pytest

from medloc.curriculum import build_scheduler, schedule_config
from medloc.parsing import parse_completion
from medloc.rewards import accuracy_reward, band_reward, binary_reward, hybrid_reward, total_rewards

EPS = 1e-9


def test_hybrid_by_hand_at_and_around_tau():
    # τ = 0.5, λ = 0.5: below τ only λ·IoU; at and above τ 1 + λ·IoU
    ious = np.array([0.0, 0.2, 0.5 - EPS, 0.5, 0.5 + EPS, 1.0])
    r = hybrid_reward(ious, 0.5, 0.5, ">=")
    assert r == pytest.approx([0.0, 0.1, 0.25 - 0.5 * EPS, 1.25, 1.25 + 0.5 * EPS, 1.5])
    # ">" (early VLM-R1): IoU exactly τ is a miss, 0.25 = 0.5 · 0.5
    assert hybrid_reward([0.5], 0.5, 0.5, ">")[0] == pytest.approx(0.25)
    # λ = 0 is binary
    assert hybrid_reward(ious, 0.5, 0.0).tolist() == binary_reward(ious, 0.5).tolist()


def test_band_by_hand_at_each_edge():
    # τ = 0.5, w = 0.2: lower edge L = 0.3; r = (IoU − 0.3) / 0.2 between
    ious = np.array([0.0, 0.3 - EPS, 0.3, 0.3 + 0.02, 0.4, 0.5 - EPS, 0.5, 0.5 + EPS, 0.9])
    r = band_reward(ious, 0.5, 0.2, ">=")
    assert r == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.5, 1.0 - EPS / 0.2, 1.0, 1.0, 1.0])
    # ">": IoU exactly τ is not a hit, the ramp gives (0.5 − 0.3)/0.2 = 1 all the same
    assert band_reward([0.5], 0.5, 0.2, ">")[0] == pytest.approx(1.0)
    assert band_reward([0.45], 0.5, 0.2, ">")[0] == pytest.approx(0.75)


def test_band_lower_edge_is_held_at_zero():
    # τ = 0.1, w = 0.2: τ − w = −0.1 -> L = 0, so r = IoU / 0.1 below τ and IoU 0 still gets 0
    r = band_reward([0.0, 0.05, 0.1, 0.3], 0.1, 0.2)
    assert r.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    # τ = 0 with ">" (L = 0, no ramp): IoU 0 is 0, any overlap is a hit
    assert band_reward([0.0, 0.01], 0.0, 0.2, ">").tolist() == [0.0, 1.0]


def test_parse_failures_score_zero_and_nan_is_a_miss():
    # parse failures enter as IoU 0.0 (and NaN is treated as 0.0): no reward under either kind
    for kind, extra in (("hybrid", {"hybrid_lambda": 0.5}), ("band", {"band_width": 0.2})):
        r = accuracy_reward([0.0, float("nan")], kind, 0.3, ">=", **extra)
        assert r.tolist() == [0.0, 0.0], kind


def test_dispatcher_needs_tau_and_the_kinds_own_parameter():
    with pytest.raises(ValueError, match="hybrid_lambda"):
        accuracy_reward([0.4], "hybrid", 0.3)
    with pytest.raises(ValueError, match="band_width"):
        accuracy_reward([0.4], "band", 0.3)
    with pytest.raises(ValueError, match="threshold"):
        accuracy_reward([0.4], "band", None, band_width=0.2)
    with pytest.raises(ValueError, match="unknown reward kind 'bands'"):
        accuracy_reward([0.4], "bands", 0.3, band_width=0.2)
    # binary ignores λ and w (the reward config always carries both)
    assert accuracy_reward([0.4], "binary", 0.3, hybrid_lambda=0.5, band_width=0.2).tolist() == [1.0]


def test_tau_comes_from_the_schedule():
    # MedLoc-R1 on two steps with window 2: τ0 = 0.1 -> raise by 0.1 once the window passes
    cfg = schedule_config({"schedule": "medloc", "window": 2, "tau0": 0.1, "tau_target": 0.5,
                           "delta": 0.0, "pass_table": [[0.0, 0.5, 0.5]],
                           "piecewise_bands": [[0.0, 0.1]]})
    sched = build_scheduler(cfg, total_steps=3)
    ious = np.array([0.15, 0.15])
    assert band_reward(ious, sched.tau, 0.2, sched.op).tolist() == [1.0, 1.0]  # τ = 0.1
    sched.observe(0, ious)
    sched.observe(1, ious)  # full window: hit rate 1, σ 0, margin 0.05 -> raise to 0.2
    assert sched.tau == pytest.approx(0.2)
    # now L = 0, r = 0.15 / 0.2 = 0.75; hybrid: 0 + 0.5 · 0.15
    assert band_reward(ious, sched.tau, 0.2, sched.op) == pytest.approx([0.75, 0.75])
    assert hybrid_reward(ious, sched.tau, 0.5, sched.op) == pytest.approx([0.075, 0.075])


def test_total_reward_adds_the_format_reward_as_for_binary():
    parsed = [parse_completion(t, answer_format="bare_list")
              for t in ("<answer>[1,2,3,4]</answer>", "no box here")]
    total, metrics = total_rewards([0.6, 0.0], parsed, kind="band", threshold=0.5, op=">=",
                                   accuracy_weight=1.0, format_weight=1.0, hybrid_lambda=0.5,
                                   band_width=0.2)
    fmt = [1.0 if p.format_ok else 0.0 for p in parsed]
    assert total.tolist() == pytest.approx([1.0 + fmt[0], 0.0 + fmt[1]])
    assert metrics["reward/accuracy"] == pytest.approx(0.5)
    total_h, _ = total_rewards([0.6, 0.0], parsed, kind="hybrid", threshold=0.5, op=">=",
                               accuracy_weight=1.0, format_weight=1.0, hybrid_lambda=0.5,
                               band_width=0.2)
    assert total_h.tolist() == pytest.approx([1.3 + fmt[0], fmt[1]])
