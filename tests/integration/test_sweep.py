"""The embedded Table 1 pipeline, shrunk to a few steps, end to end: stand-in SFT -> one Hydra
multirun over every Table 1 arm (2 cells in parallel, joblib) -> evaluation -> table -> plots; then a
rerun skips every finished cell. This is `make reproduce-table1 QUICK=1` with tiny budgets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARMS = {"zero_shot", "sft", "vlm_r1", "v_triune_medloc_range", "raw_iou", "medloc"}


def _sweep(tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MEDLOC_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "experiments.sweep", "table1", "--quick", "1", "--jobs", "2",
           "--sparsity-prompts", "8", "--runs-dir", str(tmp / "runs"), "--data-root", str(tmp / "data"), "--",
           f"cache_dir={tmp / 'cache'}", "trainer.max_steps=3", "dataset.phantom.n_images=60",
           "dataset.max_eval_samples=6", "trainer.sft_batch_size=8", "eval.batch_size=6",
           "logger.progress=false"]
    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).resolve().parents[2])
    if out.returncode != 0:
        print(out.stdout[-6000:], out.stderr[-6000:])
    assert out.returncode == 0
    return out


def test_embedded_table1_end_to_end_and_rerun_skips(tmp_path: Path) -> None:
    first = _sweep(tmp_path)
    sweep = tmp_path / "runs" / "table1_embedded"
    infos = [json.loads(p.read_text()) for p in sweep.rglob("run_info.json")]
    # QUICK: one twin (phantom_ham10000), one seed, every Table 1 arm of the embedded preset
    assert {i["method"] for i in infos} == ARMS
    assert {i["dataset"] for i in infos} == {"phantom_ham10000"} and {i["seed"] for i in infos} == {0}
    for run in (p.parent for p in sweep.rglob("run_info.json")):
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert metrics["n"] == 6
        info = json.loads((run / "run_info.json").read_text())
        # every cell starts from the cached stand-in
        assert info["init_from"].endswith("standin/tiny-1m/final")
        if info["method"] not in ("zero_shot", "sft"):
            steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert steps == [0, 1, 2]
    assert (tmp_path / "cache" / "standin" / "tiny-1m" / "final" / "config.json").is_file()

    rows = list(csv.DictReader((sweep / "table1.csv").open()))
    assert ARMS <= {r["method"] for r in rows}  # one column per arm (+ the paper's V-Triune)
    for name in ("dead_groups", "tau", "acc_curves"):
        assert (sweep / "plots" / f"phantom_ham10000_{name}.png").stat().st_size > 1000
    assert "Table 1" in first.stdout
    probe = json.loads((sweep / "sparsity_phantom_ham10000.json").read_text())
    assert probe["prompts"] == 8 and set(probe["by_threshold"]) == {"0.10", "0.30", "0.50", "0.75"}

    # an interrupted or repeated sweep continues: every finished cell is skipped
    second = _sweep(tmp_path)
    assert second.stdout.count("[skip]") + second.stderr.count("[skip]") >= len(ARMS) + 1
