"""Who builds a run's dataset (data_prep/build.py, medloc/prepare.py, conf/config.yaml).

- The library only checks: a missing phantom folder stops with a message naming
  ``python -m data_prep.build``, a missing real dataset names its converter command.
- The Hydra callback that conf/config.yaml registers, instantiated from that config as Hydra does
  before a job, builds the job's missing phantom twin (generated in the real layout, converted);
  afterwards the library's check passes. ``python -m data_prep.build OVERRIDES`` does the same
  from the command line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _compose(overrides: list[str], *, with_hydra: bool = False):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medloc.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def _small(tmp_path: Path) -> list[str]:
    return ["debug=cpu_tiny", f"data_root={tmp_path / 'data'}", f"cache_dir={tmp_path / 'cache'}",
            "dataset.phantom.n_images=10"]


def test_the_library_names_the_command_that_makes_a_missing_dataset(tmp_path):
    from medloc.config import to_run_config
    from medloc.prepare import require_dataset

    phantom = to_run_config(_compose(_small(tmp_path))).dataset
    with pytest.raises(FileNotFoundError, match=r"python -m data_prep\.build OVERRIDES"):
        require_dataset(phantom)
    real = to_run_config(_compose([f"data_root={tmp_path}", "dataset=heel"])).dataset
    with pytest.raises(FileNotFoundError, match=rf"python -m data_prep\.heel --src {tmp_path}/raw/"):
        require_dataset(real)
    assert not (tmp_path / "data").exists()


def test_the_configured_callback_builds_the_missing_phantom_twin(tmp_path):
    from hydra.utils import instantiate

    from medloc.config import to_run_config
    from medloc.prepare import RECIPE, require_dataset

    full = _compose(_small(tmp_path), with_hydra=True)  # what Hydra hands a callback
    for cb in [instantiate(c) for c in full.hydra.callbacks.values()]:
        cb.on_job_start(config=full, task_function=None)
    ds = to_run_config(_compose(_small(tmp_path))).dataset
    out = require_dataset(ds)  # passes now
    assert (out / "train.jsonl").stat().st_size > 0 and (out / RECIPE).is_file()
    assert (Path(ds.raw_dir) / "HAM10000_metadata.csv").is_file()  # the real layout, converted


def test_the_command_builds_what_the_run_reads(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep.build", *_small(tmp_path)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = [p.name for p in (tmp_path / "data").iterdir() if (p / "test.jsonl").is_file()]
    assert built == ["phantom_ham10000-easy-n10-s0"] and "dataset phantom_ham10000" in proc.stdout
    assert (tmp_path / "cache" / "models" / "tiny-1m" / "config.json").is_file()
