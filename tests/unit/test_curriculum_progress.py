"""The baselines' schedules (docs/method.md §4): fixed τ, no threshold (Raw-IoU's), V-Triune (paper
preset and the MedLoc-range preset) and the fixed-conservative / moderate / aggressive step presets
(conf/curriculum/*.yaml), checked at their boundary steps, with their raise records and state
round-trip.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medloc.curriculum import build_scheduler, schedule_config
from medloc.curriculum.progress import preset_threshold, v_triune_threshold

CONF = Path(__file__).resolve().parents[2] / "conf" / "curriculum"


def cfg_of(name: str, **overrides):
    """The schedule config that conf/curriculum/<name>.yaml describes, with ``overrides``."""
    return schedule_config({**OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")),
                            **overrides})


def taus(schedule: str, total_steps: int, **overrides) -> list[float | None]:
    """τ used at every step 0..T-1, read from the metrics of observe()."""
    sched = build_scheduler(cfg_of(schedule, **overrides), total_steps)
    out = []
    for k in range(total_steps):
        m = sched.observe(k, [0.5])
        out.append(m.get("curriculum/tau"))
    return out


def test_fixed_schedule():
    sched = build_scheduler(cfg_of("fixed", tau=0.5, op=">"), 50)
    assert (sched.op, sched.tau) == (">", 0.5)
    assert taus("fixed", 50, tau=0.5) == [0.5] * 50
    assert sched.history == []


def test_none_schedule_has_no_threshold():
    sched = build_scheduler(cfg_of("none"), 10)
    assert sched.tau is None
    m = sched.observe(0, [0.3, 0.9])
    assert "curriculum/tau" not in m
    assert m == {"curriculum/raised": 0.0, "curriculum/raises": 0.0}


def test_v_triune_paper_preset_boundaries():
    # T = 100, progress t/T: t <= 10 (t/T <= 0.10) -> 0.85; 11..25 (<= 0.25) -> 0.95; 26.. -> 0.99
    sched = build_scheduler(cfg_of("v_triune"), 100)
    assert sched.op == ">="
    t = taus("v_triune", 100)
    assert t == [0.85] * 11 + [0.95] * 15 + [0.99] * 74
    assert (t[10], t[11], t[25], t[26]) == (0.85, 0.95, 0.95, 0.99)
    for k in range(100):
        sched.observe(k, [0.9])
    # the change is recorded at the last step that used the old ε
    assert [(r.step, r.old_tau, r.new_tau) for r in sched.history] == [(10, 0.85, 0.95), (25, 0.95, 0.99)]
    assert sched.history[0].hit_rate is None  # progress schedules look at no statistics


def test_v_triune_medloc_range_preset():
    # same fractions, thresholds 0.3 / 0.5 / 0.8 (ASSUMED, docs/method.md §4); T = 20:
    # t/T <= 0.10 -> t <= 2; t/T <= 0.25 -> t <= 5
    assert taus("v_triune_medloc_range", 20) == [0.3] * 3 + [0.5] * 3 + [0.8] * 14


def test_v_triune_threshold_function():
    f, e = [0.10, 0.25], [0.85, 0.95, 0.99]
    assert [v_triune_threshold(p, f, e) for p in (0.0, 0.1, 0.1000001, 0.25, 0.26, 1.0)] == \
        [0.85, 0.85, 0.95, 0.95, 0.99, 0.99]


@pytest.mark.parametrize(
    ("schedule", "raise_steps"),
    [
        # T = 100, 4 equal raises of (0.8 - 0.3)/4 = 0.125 at t/T = span·i/4:
        ("fixed_conservative", [20, 40, 60, 80]),  # span 0.8 -> t/T = 0.2, 0.4, 0.6, 0.8
        ("fixed_moderate", [13, 25, 38, 50]),  # span 0.5 -> 0.125, 0.25, 0.375, 0.5 -> first
        #                                        integer steps >= 12.5, 25, 37.5, 50
        ("fixed_aggressive", [5, 10, 15, 20]),  # span 0.2 -> 0.05, 0.10, 0.15, 0.20
    ],
)
def test_fixed_presets_boundaries(schedule, raise_steps):
    t = taus(schedule, 100)
    levels = [0.3, 0.425, 0.55, 0.675, 0.8]
    expected = []
    edges = [0, *raise_steps, 100]
    for level, (a, b) in zip(levels, itertools.pairwise(edges)):
        expected += [level] * (b - a)
    assert t == expected
    sched = build_scheduler(cfg_of(schedule), 100)
    for k in range(100):
        sched.observe(k, [0.1])  # performance is ignored
    assert [r.step for r in sched.history] == [s - 1 for s in raise_steps]
    assert [r.new_tau for r in sched.history] == levels[1:]


def test_preset_odd_total_steps():
    # T = 7, conservative boundaries 0.2 0.4 0.6 0.8: t/T = 0, .143, .286, .429, .571, .714, .857
    # -> raises counted: 0, 0, 1, 2, 2, 3, 4
    assert taus("fixed_conservative", 7) == [0.3, 0.3, 0.425, 0.55, 0.55, 0.675, 0.8]
    assert preset_threshold(1.0, tau0=0.3, tau_target=0.8, span=0.8, n_raises=4) == 0.8


def test_preset_uses_config_raises_and_range():
    # 2 raises from 0.2 to 0.6 over the first half of T = 10: at t/T = 0.25 (t = 3) and 0.5 (t = 5)
    assert taus("fixed_moderate", 10, tau0=0.2, tau_target=0.6, n_raises=2) == \
        [0.2] * 3 + [0.4] * 2 + [0.6] * 5


@pytest.mark.parametrize("schedule", ["fixed", "none", "v_triune", "fixed_aggressive"])
def test_progress_state_round_trip(schedule):
    cfg = cfg_of(schedule)
    full = build_scheduler(cfg, 40)
    ref = [full.observe(k, [0.5]) for k in range(40)]
    first = build_scheduler(cfg, 40)
    for k in range(17):
        first.observe(k, [0.5])
    resumed = build_scheduler(cfg, 40)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.observe(k, [0.5]) for k in range(17, 40)] == ref[17:]
    assert resumed.history == full.history


def test_progress_state_rejects_other_total_steps():
    state = build_scheduler(cfg_of("v_triune"), 40).state_dict()
    with pytest.raises(ValueError, match="total_steps=40 but this scheduler has total_steps=50"):
        build_scheduler(cfg_of("v_triune"), 50).load_state_dict(state)
