"""Hypothesis properties of every threshold schedule (docs/method.md §3–4):

- τ never decreases, never exceeds τ_target and never drops below τ_0 (MedLoc-R1, any settings,
  any IoU stream); every raise record is consistent with the τ sequence;
- saving the state mid-stream (through JSON) and resuming in a fresh scheduler gives exactly the
  same future τ sequence, metrics and history as an uninterrupted run, for every schedule.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from medloc.curriculum import MedLocConfig, build_scheduler, schedule_config

# IoUs drawn from a few "interesting" values (threshold edges) plus anything in [0, 1]
iou_value = st.one_of(
    st.sampled_from([0.0, 0.3, 0.45, 0.5, 0.55, 0.65, 0.75, 0.8, 0.9, 1.0]),
    st.floats(0.0, 1.0),
)
# skewed towards good steps so that raises actually happen
step_st = st.lists(iou_value, min_size=1, max_size=6)
stream_st = st.lists(step_st, min_size=1, max_size=60)

CONF = Path(__file__).resolve().parents[2] / "conf" / "curriculum"


def cfg_of(name: str):
    """The schedule config that conf/curriculum/<name>.yaml describes."""
    return schedule_config(OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")))


medloc_cfg_st = st.builds(
    MedLocConfig,
    schedule=st.just("medloc"),
    window=st.integers(2, 6),
    refresh=st.sampled_from(["semi", "full", "quarter", "none"]),
    step=st.sampled_from(["piecewise", "linear", "cosine"]),
    check_reward=st.booleans(),
    check_stability=st.booleans(),
    check_margin=st.booleans(),
    std_over=st.sampled_from(["step_means", "all_rewards"]),
    op=st.sampled_from([">=", ">"]),
    delta=st.sampled_from([-0.2, 0.0, 0.05, 0.1]),
)

any_cfg_st = st.one_of(
    medloc_cfg_st,
    st.sampled_from([
        "fixed", "none", "v_triune", "v_triune_medloc_range", "fixed_conservative",
        "fixed_moderate", "fixed_aggressive",
    ]).map(cfg_of),
)


@settings(max_examples=120, deadline=None)
@given(medloc_cfg_st, stream_st)
def test_tau_monotone_and_bounded(cfg, stream):
    sched = build_scheduler(cfg, total_steps=len(stream))
    seen = [sched.tau]
    for k, ious in enumerate(stream):
        m = sched.observe(k, ious)
        assert m["curriculum/tau"] == seen[-1]
        seen.append(sched.tau)
    assert all(b >= a for a, b in itertools.pairwise(seen))
    assert all(cfg.tau0 <= t <= cfg.tau_target for t in seen)
    assert all(round(t, 6) == t for t in seen)
    # every change is recorded once, at the step that caused it, with matching old/new values
    changes = [(k, a, b) for k, (a, b) in enumerate(itertools.pairwise(seen)) if b != a]
    assert [(r.step, r.old_tau, r.new_tau) for r in sched.history] == changes


@settings(max_examples=80, deadline=None)
@given(any_cfg_st, stream_st, st.data())
def test_state_round_trip_mid_stream_gives_same_future(cfg, stream, data):
    split = data.draw(st.integers(0, len(stream)), label="split")
    total = len(stream)
    uninterrupted = build_scheduler(cfg, total)
    ref = [(uninterrupted.tau, uninterrupted.observe(k, s)) for k, s in enumerate(stream)]

    first = build_scheduler(cfg, total)
    for k in range(split):
        first.observe(k, stream[k])
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # plain JSON, no NaN
    resumed = build_scheduler(cfg, total)
    resumed.load_state_dict(state)
    got = [(resumed.tau, resumed.observe(k, stream[k])) for k in range(split, total)]
    assert got == ref[split:]
    assert resumed.history == uninterrupted.history
    assert resumed.state_dict() == uninterrupted.state_dict()
