"""Every config file composes onto the schema and validates; every experiment's cells compose.

Uses Hydra's compose API (no run). A config that does not compose, has an unknown key, an
ill-typed value, or fails a dataclass check in medloc/config.py fails here.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from experiments.sweep import TABLES, experiment_name, sweep_params
from medloc.config import RunConfig, register_configs, to_run_config

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"

register_configs()


def _compose(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=False)
    return to_run_config(cfg)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUPS = ["dataset", "model", "curriculum", "reward", "grpo", "optim", "engine", "trainer",
          "logger", "arm", "preset", "debug"]


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda x: str(x)
)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    # the threshold-free schedule goes with the reward that reads no threshold (conf/arm/raw_iou)
    partner = {("curriculum", "none"): ["reward.kind=raw_iou"]}.get((group, option), [])
    cfg = _compose([f"{group}={option}", *partner])
    assert isinstance(cfg, RunConfig)


def test_defaults_are_the_papers() -> None:
    cfg = _compose([])
    # docs/method.md §2-3: G=8, T=0.9, beta=0.4, lr 1e-6, ZeRO-3; tau 0.3 -> 0.8, N=30, Δ=0.10
    assert (cfg.grpo.num_generations, cfg.grpo.temperature, cfg.grpo.beta) == (8, 0.9, 0.4)
    assert cfg.optim.lr == 1e-6 and cfg.engine.zero_stage == 3
    c = cfg.curriculum
    assert (c.schedule, c.tau0, c.tau_target, c.window, c.delta) == ("medloc", 0.3, 0.8, 30, 0.10)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
def test_every_experiment_cell_composes(experiment: str) -> None:
    """Compose every (arm, dataset, model, seed) combination the experiment's sweep names."""
    params = sweep_params(experiment)
    params.pop("seed", None)  # seeds change no config structure
    keys = sorted(params)
    combos = list(itertools.product(*(params[k] for k in keys))) or [()]
    seen = set()
    for combo in combos:
        overrides = [f"experiment={experiment}", *(f"{k}={v}" for k, v in zip(keys, combo))]
        cfg = _compose(overrides)
        if "arm" in params:  # the arm names itself: the row of the result tables it fills
            assert cfg.arm == dict(zip(keys, combo))["arm"]
        seen.add((cfg.arm, repr(cfg.curriculum), cfg.method, cfg.reward.kind,
                  cfg.model.name, cfg.dataset.name))
    if "arm" in params:  # each arm is a distinct configuration
        assert len({s[:4] for s in seen}) == len(params["arm"])


@pytest.mark.parametrize("table", TABLES)
def test_each_table_has_a_paper_and_an_embedded_experiment(table: str) -> None:
    for preset in ("paper", "embedded"):
        assert (EXPERIMENTS / f"{experiment_name(table, preset)}.yaml").is_file()
    text = (EXPERIMENTS / f"{table}.yaml").read_text()
    assert "Run:" in text.split("experiment:")[0], "an experiment file starts with its command"


def test_embedded_preset_uses_phantoms_and_the_stand_in() -> None:
    cfg = _compose(["experiment=table1_embedded", "arm=medloc", "dataset=phantom_tn3k"])
    assert cfg.dataset.phantom is not None and cfg.dataset.phantom.preset == "hard"
    assert cfg.init_from is not None and cfg.init_from.endswith("standin/tiny-1m/final")
    assert cfg.model.name == "tiny-1m" and cfg.reward.answer_format == "bare_list"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("grpo.temperature=hot", "temperature"),  # ill-typed
        ("+grpo.unknown_key=1", "unknown_key"),  # unknown key
        ("curriculum.window=1", "window"),  # dataclass range check
        ("curriculum.schedule=nope", "schedule"),
        ("grpo.aggregation=mean", "aggregation"),
        ("method=dance", "method"),
        ("reward.kind=raw_iou", "reward.kind=raw_iou reads no threshold"),
        ("curriculum=none", "needs a threshold"),
        ("+curriculum.windw=3", "windw"),
    ],
)
def test_bad_values_fail_at_start_naming_the_field(override: str, needle: str) -> None:
    with pytest.raises((ConfigCompositionException, ValueError, Exception)) as err:
        _compose([override])
    assert needle in str(err.value) or needle in str(err.value.__cause__)


def test_resolved_config_round_trips_to_yaml() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["debug=cpu_tiny"])
    text = OmegaConf.to_yaml(cfg, resolve=True)
    assert "phantom_ham10000" in text


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm"])
def test_sweep_launchers_compose(launcher: str) -> None:
    """Sweeps run in-process, in parallel local processes, or on a cluster's scheduler."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target.rsplit(".", 1)[-1].lower().startswith(
        {"basic": "basic", "joblib": "joblib", "submitit_local": "local",
         "submitit_slurm": "slurm"}[launcher])


# --- configuration mistakes as one message (medloc/cli_errors.py; issue 20, item 9) -------------


def _compose_error(overrides: list[str]) -> BaseException:
    with pytest.raises(Exception) as info:  # the exact type is what format_config_error reads
        _compose(overrides)
    return info.value


def test_unknown_key_names_node_close_matches_and_valid_keys_without_plus_advice():
    from medloc.cli_errors import format_config_error

    msg = format_config_error(_compose_error(["trainer.max_stpes=3"]))
    assert msg is not None
    assert "trainer.max_stpes: 'trainer' has no key 'max_stpes'." in msg, msg
    assert "Did you mean 'max_steps'" in msg, msg
    assert "valid keys of 'trainer': " in msg and "save_every" in msg and "resume" in msg, msg
    assert "+trainer" not in msg and "To append" not in msg, msg


def test_unknown_top_level_key_lists_the_top_level_keys():
    from medloc.cli_errors import format_config_error

    msg = format_config_error(_compose_error(["sead=3"]))
    assert msg is not None and "the top-level config has no key 'sead'" in msg, msg
    assert "Did you mean 'seed'" in msg and "curriculum" in msg and "+sead" not in msg, msg


def test_missing_option_hides_schema_names_and_suggests_close_options():
    from medloc.cli_errors import format_config_error

    msg = format_config_error(_compose_error(["dataset=ham1000"]))
    assert msg is not None
    assert "config group 'dataset' has no option 'ham1000'. Did you mean 'ham10000'" in msg, msg
    assert "tn3k" in msg and "_schema" not in msg, msg


def test_dataclass_check_is_a_config_error_with_field_and_value():
    from medloc.cli_errors import format_config_error
    from medloc.config import ConfigError

    ex = _compose_error(["curriculum=medloc", "curriculum.tau0=0.9"])
    assert isinstance(ex, ConfigError) and isinstance(ex, ValueError)
    assert format_config_error(ex) == f"config error: {ex}"
    assert "curriculum.tau0=0.9 must be <" in str(ex)


def test_other_exceptions_are_not_config_errors():
    from medloc.cli_errors import format_config_error

    assert format_config_error(RuntimeError("boom")) is None
    assert format_config_error(FileNotFoundError("model folder x does not exist")) is None
