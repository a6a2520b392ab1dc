"""medloc.curriculum.calibrate: each rule by hand on small synthetic probes, the property rules
(τ0 < τ_target always, deterministic, monotone in the probe's IoUs) with hypothesis, the replay
checks and the command line."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medloc.curriculum import MedLocConfig
from medloc.curriculum.calibrate import (
    CalibrationConfig,
    CalibrationError,
    calibrate,
    check_binding,
    choose_target,
    choose_tau0,
    compare_paths,
    cross_statistics,
    dead_fraction,
    main,
    overrides_for,
    pseudo_trajectory,
    rungs,
    step_ladder,
    window_size,
)

# 4 groups of G = 2. Best IoU per group: 0.12, 0.22, 0.31, 0.0
SMALL = np.array([[0.0, 0.12], [0.22, 0.05], [0.31, 0.0], [0.0, 0.0]])


def test_dead_fraction_and_rungs_by_hand():
    # no hit: g3 at every τ > 0; + g0 above 0.12; + g1 above 0.22; + g2 above 0.31
    assert [dead_fraction(SMALL, t, ">=") for t in (0.05, 0.12, 0.15, 0.25, 0.31, 0.35)] == \
        [0.25, 0.25, 0.5, 0.75, 0.75, 1.0]
    assert dead_fraction(SMALL, 0.12, ">") == 0.5  # 0.12 is not > 0.12
    assert rungs(0.05, 0.3) == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]  # 0.3 / 0.05 is 5.999...
    assert rungs(0.1, 0.8)[-1] == 0.8


def test_tau0_is_the_highest_rung_with_few_dead_groups():
    kw = {"rung": 0.05, "tau_cap": 0.8, "op": ">="}
    assert choose_tau0(SMALL, dead_max=0.3, **kw) == 0.1  # 0.15 has 50% dead
    assert choose_tau0(SMALL, dead_max=0.5, **kw) == 0.2  # 0.25 has 75% dead
    assert choose_tau0(SMALL, dead_max=0.1, **kw) == 0.05  # no rung qualifies: the lowest
    # never the top rung: τ_target needs one above it (cap 0.1 -> grid 0.05, 0.1)
    assert choose_tau0(np.ones((3, 2)), dead_max=0.0, rung=0.05, tau_cap=0.1, op=">=") == 0.05


def test_target_is_the_highest_rung_where_enough_groups_hit():
    kw = {"rung": 0.05, "tau_cap": 0.8, "op": ">="}
    assert choose_target(SMALL, 0.1, alive_min=0.25, **kw) == 0.3  # g2's 0.31
    assert choose_target(SMALL, 0.1, alive_min=0.5, **kw) == 0.2  # g1's 0.22 and g2
    assert choose_target(SMALL, 0.2, alive_min=0.5, **kw) == 0.25  # never at or below τ0
    assert choose_target(np.ones((2, 2)), 0.1, alive_min=0.2, **kw) == 0.8  # capped


def test_step_ladder_removes_equal_shares_of_hits():
    pooled = np.arange(0.05, 1.0, 0.1)  # 0.05, 0.15, ..., 0.95
    # h(0.1) = 9/10, h(0.5) = 5/10; one rung between: h <= 0.9 * (5/9)^(1/2) = 0.671 first at
    # τ = 0.36 (h = 6/10; at 0.26..0.35 h = 7/10)
    assert step_ladder(pooled, 0.1, 0.5, n_raises=2, resolution=0.01, op=">=") == [0.1, 0.36, 0.5]
    # a flat hit curve (every IoU 1): even spacing in τ
    assert step_ladder(np.ones(8), 0.1, 0.5, n_raises=2, resolution=0.01, op=">=") == [0.1, 0.3, 0.5]
    with pytest.raises(CalibrationError, match="tau0 < tau_target"):
        step_ladder(pooled, 0.5, 0.5, n_raises=2, resolution=0.01, op=">=")


def test_window_is_an_eighth_of_the_run():
    kw = {"frac": 0.125, "lo": 4, "hi": 30}
    # the two hand calibrations (80 -> 10, 60 -> 8) and the paper's N = 30 for 500 steps
    assert [window_size(s, **kw) for s in (80, 60, 500, 10)] == [10, 8, 30, 4]
    with pytest.raises(CalibrationError, match="steps=0"):
        window_size(0, **kw)


def test_pseudo_trajectory_takes_prompts_per_step_groups():
    traj = pseudo_trajectory(np.arange(20).reshape(10, 2) / 20, 4)  # 10 groups -> 2 steps of 4
    assert [s for s, _ in traj] == [0, 1]
    assert traj[1][1].tolist() == (np.arange(8, 16) / 20).tolist()
    with pytest.raises(CalibrationError, match="fewer than the window N=3"):
        cross_statistics(traj, 3, 0.1, ">=", "step_means")


# 4 groups of G = 2, one prompt per step; best IoU 0.5, 0.3, 0.2, 0
HAND = np.array([[0.5, 0.4], [0.3, 0.0], [0.2, 0.2], [0.0, 0.0]])


def test_calibration_by_hand():
    cal = calibrate(HAND, steps=32, prompts_per_step=1, op=">=", cfg=CalibrationConfig())
    n = cal.node
    # dead fraction 25% up to τ = 0.2, 50% at 0.25: τ0 = 0.2; one group in four hits up to 0.5
    assert (n["tau0"], n["tau_target"], n["window"]) == (0.2, 0.5, 4)  # N = round(32/8)
    # pooled hit rate h(0.2) = 5/8, h(0.5) = 1/8; goals 5/8·(1/5)^(k/5) = 0.453, 0.328, 0.238,
    # 0.172 first reached at 0.21 (h 3/8), 0.31 (2/8), 0.41 (1/8), 0.42 (1/8)
    assert n["piecewise_bands"] == [[0.2, 0.01], [0.21, 0.1], [0.31, 0.1], [0.41, 0.01], [0.42, 0.08]]
    assert (n["delta0"], n["delta_min"]) == (0.01, 0.01)
    # τ_x = 0.2 + 0.5·0.3 = 0.35; the one window (4 steps): hit rates 1, 0, 0, 0 -> P = 0.25;
    # step mean IoUs 0.45, 0.15, 0.2, 0 -> m̄ = 0.2 − 0.35 = −0.15
    assert cal.tau_cross == 0.35
    assert n["pass_table"][0][1] == 0.25 and n["delta"] == -0.15
    # σ of the step hit rates: τ 0.2 [1, .5, 1, 0] -> 0.4146; 0.21 [1, .5, 0, 0] -> 0.4146;
    # 0.31 and 0.35 [1, 0, 0, 0] -> sqrt(0.1875) = 0.4330: the largest, S = 0.43
    assert n["pass_table"] == [[0.0, 0.25, 0.43]]
    MedLocConfig(**n)  # a valid MedLoc-R1 curriculum
    assert {p["key"] for p in cal.provenance} >= {"tau0", "tau_target", "piecewise_bands", "window",
                                                  "P", "S", "delta (Δ)"}


def test_a_pilot_replaces_the_pseudo_trajectory():
    pilot = [(k, np.full(8, 0.4)) for k in range(6)]  # every IoU 0.4: hit 1 below 0.4, σ 0
    cal = calibrate(HAND, steps=32, prompts_per_step=1, op=">=", cfg=CalibrationConfig(), pilot=pilot)
    assert cal.source == "pilot"
    assert cal.node["pass_table"] == [[0.0, 1.0, 0.0]] and cal.node["delta"] == 0.05  # 0.4 − 0.35


def test_bad_constants_and_probes_fail_naming_the_field():
    with pytest.raises(CalibrationError, match="calibration.start_dead_max=1.5"):
        CalibrationConfig(start_dead_max=1.5)
    with pytest.raises(CalibrationError, match="calibration.n_raises=0"):
        CalibrationConfig(n_raises=0)
    with pytest.raises(CalibrationError, match=r"\[prompts, G\]"):
        calibrate(np.zeros(4), steps=32, prompts_per_step=1, op=">=", cfg=CalibrationConfig())
    with pytest.raises(CalibrationError, match=r"in \[0, 1\]"):
        calibrate(HAND * 3, steps=32, prompts_per_step=1, op=">=", cfg=CalibrationConfig())


def test_replay_checks_count_binding_and_compare_paths():
    node = calibrate(HAND, steps=32, prompts_per_step=1, op=">=", cfg=CalibrationConfig()).node
    # 8 steps at IoU 0.25, N = 4 (semi refresh keeps 2): full windows at steps 3, 5 and 7.
    # τ 0.2 -> 0.21 at step 3 and -> 0.31 at step 5 (hit 1, σ 0, margin >= −0.15); at step 7,
    # τ 0.31: hit rate 0 < P = 0.25 while σ 0 and margin −0.06 pass: the reward check alone holds
    traj = [(k, np.full(4, 0.25)) for k in range(8)]
    b = check_binding(traj, node)
    assert (b["windows"], b["raises"], b["taus"][0], b["taus"][-1]) == (3, 2, 0.2, 0.31)
    assert b["failed"] == {"reward": 1, "stability": 0, "margin": 0} and b["sole"]["reward"] == 1
    # another ladder (0.1 -> 0.2 -> 0.3) on the same IoUs: the same decisions, to other τ values
    c = compare_paths(traj, node, {**node, "tau0": 0.1, "piecewise_bands": [[0.1, 0.1]]})
    assert c["a"]["raise_steps"] == [3, 5] and c["b"]["raise_steps"] == [3, 5]
    assert c["first_difference"] is None
    assert (c["a"]["last_tau"], c["b"]["last_tau"]) == (0.31, 0.3)


def test_overrides_are_hydra_words_for_every_key():
    words = overrides_for({"window": 10, "tau0": 0.1, "check_margin": True, "refresh": "semi",
                           "pass_table": [[0.0, 0.5, 0.25]], "op": ">="})
    assert words == ["++curriculum.window=10", "++curriculum.tau0=0.1",
                     "++curriculum.check_margin=true", "++curriculum.refresh='semi'",
                     "++curriculum.pass_table=[[0.0,0.5,0.25]]", "++curriculum.op='>='"]


def test_command_line_writes_node_report_and_plot(tmp_path, capsys):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"ious": HAND.tolist(), "max_steps": 32, "prompts_per_step": 1,
                                 "op": ">="}))
    out = tmp_path / "cal" / "curriculum.yaml"
    assert main(["--probe", str(probe), "--out", str(out)]) == 0
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(out))
    assert node["tau0"] == 0.2 and node["pass_table"] == [[0.0, 0.25, 0.43]]
    report = out.with_suffix(".md").read_text()
    assert "| tau0 | 0.2 |" in report and "Replay check" in report
    assert out.with_suffix(".png").stat().st_size > 0
    # a probe without raw IoUs (an old sparsity JSON) and an unknown constant: exit 2, named
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"by_threshold": {}}))
    capsys.readouterr()
    assert main(["--probe", str(old), "--out", str(out)]) == 2
    assert "no 'ious' field" in capsys.readouterr().err
    assert main(["--probe", str(probe), "--out", str(out), "rungs=0.1"]) == 2
    assert "rungs=0.1" in capsys.readouterr().err


# ------------------------------------------------------------------ properties (hypothesis)

IOU = st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.13, 0.2, 0.27, 0.35, 0.5, 0.61, 0.75, 0.9, 1.0])
PROBES = st.integers(4, 10).flatmap(lambda b: st.integers(1, 4).flatmap(
    lambda g: st.lists(st.lists(IOU, min_size=g, max_size=g), min_size=b, max_size=b)))
CONFIGS = st.builds(CalibrationConfig, rung=st.sampled_from([0.05, 0.1]),
                    start_dead_max=st.floats(0, 1), target_alive_min=st.floats(0, 1),
                    n_raises=st.integers(1, 6), tau_cap=st.sampled_from([0.3, 0.8, 1.0]))


@settings(max_examples=60, deadline=None)
@given(PROBES, CONFIGS)
def test_never_tau0_at_or_above_target_and_deterministic(probe, cfg):
    ious = np.asarray(probe)
    cal = calibrate(ious, steps=32, prompts_per_step=1, op=">=", cfg=cfg)
    n = cal.node
    assert n["tau0"] < n["tau_target"] <= cfg.tau_cap + 1e-9
    edges = [b[0] for b in n["piecewise_bands"]]
    assert edges[0] == n["tau0"] and all(b > a for a, b in itertools.pairwise(edges))
    # the ladder ends exactly at τ_target
    assert math.isclose(edges[-1] + n["piecewise_bands"][-1][1], n["tau_target"], abs_tol=1e-9)
    MedLocConfig(**n)
    assert calibrate(ious.copy(), steps=32, prompts_per_step=1, op=">=", cfg=cfg).node == n


@settings(max_examples=80, deadline=None)
@given(PROBES, st.data(), CONFIGS)
def test_higher_ious_never_lower_tau0_or_target(probe, data, cfg):
    ious = np.asarray(probe)
    lift = np.asarray(data.draw(st.lists(st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.5]),
                                                  min_size=ious.shape[1], max_size=ious.shape[1]),
                                         min_size=ious.shape[0], max_size=ious.shape[0])))
    higher = np.minimum(ious + lift, 1.0)  # every IoU at least as high
    kw = {"rung": cfg.rung, "tau_cap": cfg.tau_cap, "op": ">="}
    t0, t0h = (choose_tau0(x, dead_max=cfg.start_dead_max, **kw) for x in (ious, higher))
    assert t0h >= t0
    tt = choose_target(ious, t0, alive_min=cfg.target_alive_min, **kw)
    tth = choose_target(higher, t0h, alive_min=cfg.target_alive_min, **kw)
    assert tth >= tt
    n, nh = (calibrate(x, steps=32, prompts_per_step=1, op=">=", cfg=cfg).node for x in (ious, higher))
    assert (nh["tau0"], nh["tau_target"]) == (t0h, tth) and (n["tau0"], n["tau_target"]) == (t0, tt)
