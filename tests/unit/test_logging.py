"""Rank-0 metric sinks: metrics.jsonl lines (NaN -> null), disabled ranks write nothing, wandb offline."""

from __future__ import annotations

import json
from pathlib import Path

from medloc.logging import MetricsLogger


def test_jsonl_lines_and_nan_as_null(tmp_path: Path, capsys) -> None:
    lg = MetricsLogger(tmp_path, enabled=True, max_steps=2, run_name="cell", progress=True)
    lg.log(0, {"reward/mean": 0.5, "curriculum/window_std": float("nan"), "curriculum/tau": 0.3})
    lg.log(1, {"reward/mean": 0.75})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 0, "curriculum/tau": 0.3, "curriculum/window_std": None, "reward/mean": 0.5},
        {"step": 1, "reward/mean": 0.75},
    ]
    err = capsys.readouterr().err
    # step numbers as metrics.jsonl writes them (0 first), then the count done (issue 20, finding 2)
    assert "[cell] step 0 (1/2)" in err and "[cell] step 1 (2/2)" in err
    assert "tau 0.30" in err and "reward 0.500" in err


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    lg = MetricsLogger(tmp_path, enabled=False, max_steps=1)
    lg.log(0, {"reward/mean": 1.0})
    lg.log_samples(0, [{"completion": "x"}])
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_needs_no_network(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = MetricsLogger(tmp_path, enabled=True, max_steps=1, backend="wandb",
                       wandb_mode="offline", run_name="t", progress=False)
    lg.log(0, {"reward/mean": 0.5, "curriculum/window_std": float("nan")})
    lg.close()
    assert list((tmp_path / "wandb").rglob("*.wandb")), "wandb wrote no offline run file"
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward/mean"] == 0.5


def test_console_lines_also_go_to_the_jobs_log_file(tmp_path: Path, capsys) -> None:
    # Hydra's job logging gives the root logger a FileHandler on <run dir>/train.log; console()
    # writes its lines there as printed (train.log was empty before: issue 20, finding 2).
    import logging

    from medloc.logging import console

    handler = logging.FileHandler(tmp_path / "train.log", delay=True)
    logging.getLogger().addHandler(handler)
    try:
        console("to stdout")
        console("to stderr", err=True)
        MetricsLogger(tmp_path, enabled=True, max_steps=1, run_name="r").log(0, {"reward/mean": 1.0})
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    console("after")  # no handler: not in the file
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[:2] == ["to stdout", "to stderr"]
    assert lines[2].startswith("[r] step 0 (1/1) | reward 1.000")
    assert len(lines) == 3
    assert "to stdout" in capsys.readouterr().out
