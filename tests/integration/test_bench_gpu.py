"""`make bench-gpu` cannot rot: its tiny-model run (CPU) goes through the whole script -- the
trainer's step in the reference configuration (4 prompts x G=8, gradient checkpointing,
micro-batch 8, forced completion length) and the standalone floors -- and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_gpu_tiny_runs_on_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu_step.json"
    # No process-group variables: an in-process Engine of an earlier test set MASTER_PORT, which
    # this process still holds; a child inheriting it fails with EADDRINUSE.
    dist = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_gpu", "--shape", "tiny", "--steps", "1",
         "--warmup", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "policy fwd+bwd+optimizer" in proc.stdout
    result = json.loads(out.read_text())
    assert result["rows"] == 32  # 4 prompts x G=8
    assert result["completion_tokens"] == 24  # EOS banned until max_new_tokens: equal work
    assert result["engine_zero_stage"] == 0 and result["micro_batch"] == 8
    phases = [row["phase"] for row in result["table"]]
    assert phases == ["generate", "reference forward", "policy fwd+bwd+optimizer", "step (all)"]
    for row in result["table"]:
        assert row["trainer_s"] > 0 and row["floor_s"] > 0 and row["ratio"] > 0
    step = result["table"][-1]
    # the step's floor is the sum of the parts' floors
    assert abs(step["floor_s"] - sum(r["floor_s"] for r in result["table"][:3])) < 1e-9
    assert result["table"][0]["tokens_per_s"] > 0
