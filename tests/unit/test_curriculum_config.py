"""Each threshold schedule's config (medloc.curriculum.SCHEDULES): defaults are docs/method.md's values,
every invalid value fails at build time with a message naming the field and the allowed range, a
``curriculum`` mapping becomes the chosen schedule's dataclass (keys of other schedules dropped, a
key no schedule has rejected), and the dataclasses work as OmegaConf structured-config schemas.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from medloc.curriculum import (
    FixedConfig,
    FixedStepConfig,
    MedLocConfig,
    VTriuneConfig,
    build_scheduler,
    schedule_config,
)


def test_defaults_are_the_papers():
    c = MedLocConfig()
    assert (c.schedule, c.window, c.refresh, c.step) == ("medloc", 30, "semi", "piecewise")
    assert (c.tau0, c.tau_target, c.delta) == (0.3, 0.8, 0.10)
    assert (c.delta0, c.delta_min) == (0.15, 0.02)  # ASSUMED (docs/method.md §3)
    assert c.pass_table == [[0.0, 0.80, 0.20], [0.60, 0.75, 0.35], [0.75, 0.55, 0.40]]
    assert c.piecewise_bands == [[0.0, 0.15], [0.45, 0.10], [0.70, 0.05]]
    assert (c.check_reward, c.check_stability, c.check_margin) == (True, True, True)
    assert (c.op, FixedConfig().tau, c.std_over) == (">=", 0.5, "step_means")
    v = VTriuneConfig()
    assert (v.fractions, v.eps) == ([0.10, 0.25], [0.85, 0.95, 0.99])
    f = FixedStepConfig()
    assert (f.tau0, f.tau_target, f.n_raises, f.span) == (0.3, 0.8, 4, 0.8)


def test_mutable_defaults_are_not_shared():
    a, b = MedLocConfig(), MedLocConfig()
    a.pass_table[0][1] = 0.5
    assert b.pass_table[0][1] == 0.8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "adaptive"}, r"curriculum\.schedule='adaptive'.*'medloc'"),
        ({"refresh": "half"}, r"curriculum\.refresh='half'.*'semi'"),
        ({"step": "exponential"}, r"curriculum\.step='exponential'.*'piecewise'"),
        ({"op": "=>"}, r"curriculum\.op='=>'.*'>='"),
        ({"std_over": "steps"}, r"curriculum\.std_over='steps'"),
        ({"window": 1}, r"curriculum\.window=1 must be an integer >= 2"),
        ({"window": 2.5}, r"curriculum\.window=2\.5"),
        ({"tau0": 0.8}, r"tau0=0\.8 must be < tau_target=0\.8"),
        ({"tau0": 0.9}, r"tau0=0\.9 must be < tau_target"),
        ({"tau_target": 1.2}, r"curriculum\.tau_target=1\.2 must be a number in \[0\.0, 1\.0\]"),
        ({"tau0": -0.1}, r"curriculum\.tau0=-0\.1"),
        ({"delta0": -0.05}, r"curriculum\.delta0=-0\.05 must be a number in \[1e-06, 1\.0\]"),
        ({"delta_min": 0.0}, r"curriculum\.delta_min=0\.0"),
        ({"delta_min": 0.2}, r"delta_min=0\.2 must be <= delta0=0\.15"),
        ({"delta": 1.5}, r"curriculum\.delta=1\.5"),
        ({"pass_table": [[0.0, 1.2, 0.2]]}, r"pass_table\[0\]\[1\] \(P\)=1\.2 must be a number in \[0\.0, 1\.0\]"),
        ({"pass_table": [[0.0, 0.8, -0.1]]}, r"pass_table\[0\]\[2\] \(S\)=-0\.1"),
        ({"pass_table": [[0.0, 0.8]]}, r"pass_table\[0\]=\[0\.0, 0\.8\] must have 3 numbers"),
        ({"pass_table": [[0.0, 0.8, 0.2], [0.0, 0.7, 0.3]]}, r"strictly increasing"),
        ({"pass_table": [[0.4, 0.8, 0.2]]}, r"first lower τ edge 0\.4 must be <= tau0=0\.3"),
        ({"pass_table": []}, r"pass_table must have at least one row"),
        ({"piecewise_bands": [[0.0, -0.15]]}, r"piecewise_bands\[0\]\[1\] \(δ\)=-0\.15"),
        ({"schedule": "fixed", "tau": 1.5}, r"curriculum\.tau=1\.5"),
        ({"schedule": "v_triune", "fractions": [0.25, 0.10]}, r"fractions=\[0\.25, 0\.1\] must be strictly"),
        ({"schedule": "v_triune", "fractions": [0.0, 0.5]}, r"fractions\[0\]=0\.0 must be a number in \(0\.0, 1\.0\)"),
        ({"schedule": "v_triune", "eps": [0.85, 0.95]}, r"eps has 2 values; need len\(fractions\)\+1 = 3"),
        ({"schedule": "v_triune", "eps": [0.3, 0.5, 1.1]}, r"eps\[2\]=1\.1"),
        ({"schedule": "fixed_step", "n_raises": 0}, r"n_raises=0 must be an integer >= 1"),
        ({"schedule": "fixed_step", "span": 0.0}, r"span=0\.0"),
        ({"check_reward": "yes"}, r"curriculum\.check_reward='yes' must be true or false"),
        ({"windw": 3}, r"unknown curriculum key\(s\) \['windw'\].*'window'"),
    ],
)
def test_invalid_values_name_field_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule_config(kwargs)


def test_keys_of_other_schedules_are_dropped():
    # a preset may tune MedLoc-R1's window whatever schedule a run picks
    cfg = schedule_config({"schedule": "fixed", "tau": 0.4, "window": 10, "tau0": 0.1})
    assert cfg == FixedConfig(tau=0.4)
    step = schedule_config({"schedule": "fixed_step", "window": 10, "tau0": 0.1, "span": 0.5})
    assert (step.tau0, step.span) == (0.1, 0.5)  # tau0 is a key of both


def test_build_scheduler_rejects_bad_total_steps():
    with pytest.raises(ValueError, match="total_steps=0 must be an integer >= 1"):
        build_scheduler(MedLocConfig(), 0)


def test_omegaconf_structured_schema_round_trip():
    schema = OmegaConf.structured(MedLocConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"schedule": "medloc", "refresh": "quarter",
                                                       "window": 20, "check_margin": False}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, MedLocConfig)
    assert (cfg.refresh, cfg.window, cfg.check_margin) == ("quarter", 20, False)
    assert cfg.pass_table == MedLocConfig().pass_table
    sched = build_scheduler(cfg, total_steps=10)
    assert sched.tau == 0.3
    bad = OmegaConf.merge(schema, OmegaConf.create({"refresh": "half"}))
    with pytest.raises(ValueError, match="curriculum.refresh='half'"):
        OmegaConf.to_object(bad)


def test_build_scheduler_validates_a_dictconfig():
    # the trainer may pass the Hydra group as a DictConfig; it is validated like the dataclass
    node = OmegaConf.structured(MedLocConfig)
    sched = build_scheduler(OmegaConf.merge(node, {"window": 4, "refresh": "full"}), 10)
    assert (sched.window.window, sched.refresh) == (4, "full")
    node.window = 1  # assignment on a DictConfig bypasses __post_init__ ...
    with pytest.raises(ValueError, match="curriculum.window=1"):
        build_scheduler(node, 10)  # ... so build_scheduler checks it
