"""The beyond-the-paper arms (docs/beyond.md) reach training as configured:

- ``reward.kind=hybrid`` / ``band``: one GRPO step of the tiny model hands the reward its kind,
  the schedule's τ and op, and the config's λ and w; the step's ``reward/accuracy`` is the mean of
  ``hybrid_reward`` / ``band_reward`` on the step's sampled IoUs.
- ``arm=medloc_calibrated``: the overrides ``medloc.curriculum.calibrate`` prints
  (``++curriculum.KEY=VALUE``) load the calibrated node into the run's curriculum, over the
  embedded preset's values, exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from medloc import runtime
from medloc.config import register_configs, to_run_config
from medloc.curriculum import MedLocConfig
from medloc.curriculum.calibrate import CalibrationConfig, calibrate, overrides_for
from medloc.grpo import trainer as trainer_module
from medloc.grpo.trainer import GRPOTrainer
from medloc.rewards import band_reward, hybrid_reward

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("kind,param,value", [("hybrid", "hybrid_lambda", 0.7),
                                              ("band", "band_width", 0.15)])
def test_a_grpo_step_rewards_with_the_configured_kind(compose_cfg, tiny_model_dir, phantom_dataset,
                                                      tmp_path, monkeypatch, kind, param, value):
    cfg = compose_cfg(["engine=zero0", f"reward.kind={kind}", f"reward.{param}={value}",
                       "curriculum.tau0=0.05"])
    trainer = GRPOTrainer(cfg, tmp_path, str(tiny_model_dir))
    seen = {}
    real = trainer_module.total_rewards

    def spy(ious, parsed, **kw):
        seen.update(kw, ious=np.asarray(ious, dtype=np.float64).copy())
        return real(ious, parsed, **kw)

    monkeypatch.setattr(trainer_module, "total_rewards", spy)
    runtime.seed_step(cfg.seed, 0, trainer.rank)
    metrics = trainer.train_step(0)
    assert seen["kind"] == kind and seen["threshold"] == 0.05 and seen["op"] == ">="
    assert seen[param] == value
    ious = seen["ious"]
    expected = (hybrid_reward(ious, 0.05, value) if kind == "hybrid"
                else band_reward(ious, 0.05, value))
    assert metrics["reward/accuracy"] == pytest.approx(float(expected.mean()), abs=1e-12)


def test_calibrated_overrides_load_the_node_over_the_preset():
    rng = np.random.default_rng(0)
    probe = np.clip(rng.beta(1.2, 5.0, size=(48, 8)), 0.0, 1.0)  # [prompts, G]
    node = calibrate(probe, steps=80, prompts_per_step=4, op=">=", cfg=CalibrationConfig()).node
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=[
            "experiment=beyond_embedded", "arm=medloc_calibrated", "dataset=phantom_heel",
            *overrides_for(node)]))
    assert cfg.arm == "medloc_calibrated" and cfg.reward.kind == "binary"
    assert cfg.curriculum == MedLocConfig(**node)
    # without the overrides the arm is the preset's MedLoc-R1 (the sweep always passes them)
    assert node["tau0"] != 0.1 or node["window"] != 10 or node["pass_table"] != [[0.0, 0.5, 0.25]]
