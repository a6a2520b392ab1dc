"""Fixtures of the integration tests that several test files share.

- ``table1_sweep`` (session, slow tests only): the embedded Table 1 pipeline of
  ``make reproduce-table1 QUICK=1`` with tiny budgets, run ONCE into a temporary folder
  (``.tmp``; the sweep is ``.sweep``, the first run's output ``.first``); ``.rerun(...)`` runs the
  same command again there (tests/integration/test_sweep.py), and
  tests/integration/test_notebook.py executes the notebook on the same sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Table1Sweep:
    tmp: Path
    first: subprocess.CompletedProcess | None = None

    @property
    def sweep(self) -> Path:
        return self.tmp / "runs" / "table1_embedded"

    def rerun(self, *, jobs: int = 2, extra: tuple[str, ...] = (), check: bool = True
              ) -> subprocess.CompletedProcess:
        """``python -m experiments.sweep table1 --quick 1`` with tiny budgets, in ``tmp``."""
        tmp = self.tmp
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "experiments.sweep", "table1", "--quick", "1", "--jobs",
               str(jobs), "--sparsity-prompts", "8", "--runs-dir", str(tmp / "runs"),
               "--data-root", str(tmp / "data"), "--",
               f"cache_dir={tmp / 'cache'}", "trainer.max_steps=3", "dataset.phantom.n_images=60",
               "dataset.max_eval_samples=6", "trainer.sft_batch_size=8", "eval.batch_size=6",
               "logger.progress=false", *extra]
        out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                             timeout=900, cwd=REPO)
        if check and out.returncode != 0:
            print(out.stdout[-6000:], out.stderr[-6000:])
        assert out.returncode == 0 or not check
        return out


@pytest.fixture(scope="session")
def table1_sweep(tmp_path_factory: pytest.TempPathFactory) -> Table1Sweep:
    run = Table1Sweep(tmp_path_factory.mktemp("table1_sweep"))
    run.first = run.rerun()
    return run
