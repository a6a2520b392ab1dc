"""Adding a threshold schedule takes three files, as the README's "Adding a threshold schedule"
says: its module (a config dataclass with ``build()`` and a Scheduler), one line in
``medloc.curriculum.SCHEDULES``, one YAML in ``conf/curriculum/``. This test does exactly that in
a temporary copy (the module on a temporary path, the line by monkeypatch, the YAML in a copy of
``conf/``), then composes the run config, builds the scheduler, steps it and resumes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import medloc.curriculum
from medloc.config import register_configs, to_run_config
from medloc.curriculum import build_scheduler

CONF = Path(__file__).resolve().parents[2] / "conf"

# 1. its module (README: medloc/curriculum/every_k.py)
MODULE = '''
from dataclasses import dataclass

from medloc.curriculum.base import Scheduler, round_tau
from medloc.curriculum.config import ScheduleConfig, check_range


class EveryKScheduler(Scheduler):
    """τ = min(tau0 + step·⌊t / every⌋, tau_max): raised on a clock, whatever the model does."""

    def __init__(self, *, tau0: float, step: float, every: int, tau_max: float, op: str) -> None:
        super().__init__(schedule="every_k", op=op)
        self.tau0, self.step, self.every, self.tau_max = tau0, step, every, tau_max

    @property
    def tau(self) -> float:  # the threshold of the next step to observe
        return round_tau(min(self.tau0 + self.step * (self.next_step // self.every), self.tau_max))

    def _advance(self, step, ious):
        return None  # no window statistics


@dataclass
class EveryKConfig(ScheduleConfig):
    schedule: str = "every_k"
    tau0: float = 0.3
    step: float = 0.1
    every: int = 10
    tau_max: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("tau_max", self.tau_max, 0.0, 1.0)

    def build(self, total_steps: int) -> EveryKScheduler:
        return EveryKScheduler(tau0=self.tau0, step=self.step, every=self.every,
                               tau_max=self.tau_max, op=self.op)
'''

# 3. one YAML (README: conf/curriculum/every_k.yaml)
YAML = """\
# τ raised by 0.1 every 2 steps from 0.2, at most 0.4.
schedule: every_k
tau0: 0.2
step: 0.1
every: 2
tau_max: 0.4
"""


@pytest.fixture
def with_every_k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "every_k.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    from every_k import EveryKConfig  # the module's config class

    # 2. one line of dispatch: "every_k": EveryKConfig,
    monkeypatch.setitem(medloc.curriculum.SCHEDULES, "every_k", EveryKConfig)
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("experiment"))
    (conf / "curriculum" / "every_k.yaml").write_text(YAML)
    return conf


def test_a_new_schedule_in_three_files(with_every_k: Path) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(with_every_k), version_base="1.3"):
        raw = compose(config_name="config", overrides=["curriculum=every_k", "debug=cpu_tiny"])
    cfg = to_run_config(raw)
    assert type(cfg.curriculum).__name__ == "EveryKConfig" and cfg.curriculum.every == 2
    assert cfg.reward.kind == "binary"  # the reward reads the new schedule's τ as any other

    sched = build_scheduler(cfg.curriculum, total_steps=cfg.trainer.max_steps)
    taus = [sched.observe(k, [0.5, 0.1])["curriculum/tau"] for k in range(6)]
    # steps 0-1: 0.2, 2-3: 0.3, 4-5: 0.4 (capped at tau_max from step 4 on)
    assert taus == [0.2, 0.2, 0.3, 0.3, 0.4, 0.4]
    assert [(r.step, r.old_tau, r.new_tau) for r in sched.history] == [(1, 0.2, 0.3), (3, 0.3, 0.4)]

    # checkpoints resume it like any schedule
    first = build_scheduler(cfg.curriculum, total_steps=6)
    for k in range(3):
        first.observe(k, [0.5])
    resumed = build_scheduler(cfg.curriculum, total_steps=6)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.observe(k, [0.5])["curriculum/tau"] for k in range(3, 6)] == taus[3:]


def test_an_unknown_schedule_names_the_allowed_ones() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose(config_name="config", overrides=["curriculum.schedule=every_k"])
    with pytest.raises(ValueError, match=r"curriculum\.schedule='every_k' is not allowed.*'medloc'"):
        to_run_config(raw)
