"""Plots (eval.plots): training curves over runs grouped by method, Acc@t curves, smoothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval.plots import moving_average, plot_acc_curves, plot_curves
from eval.runs import read_metrics_jsonl
from medloc.metrics import acc_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(root: Path, name: str, method: str, seed: int, taus: list[float]) -> Path:
    d = root / name
    d.mkdir()
    (d / "run_info.json").write_text(json.dumps(
        {"dataset": "phantom_ham10000", "arm": method, "seed": seed, "model": "tiny"}))
    lines = [{"step": i + 1, "curriculum/tau": t, "reward/dead_group_frac": 0.5}
             for i, t in enumerate(taus)]
    lines.insert(1, {"step": 0, "event": "no tau on this line"})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_moving_average_hand_worked():
    # window 2: [1, (1+2)/2, (2+3)/2, (3+4)/2]
    np.testing.assert_allclose(moving_average(np.array([1.0, 2, 3, 4]), 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(moving_average(np.array([1.0, 2, 3]), 1), [1, 2, 3])
    with pytest.raises(ValueError, match="window=0"):
        moving_average(np.array([1.0]), 0)


def test_read_metrics_jsonl(tmp_path):
    d = _run(tmp_path, "r", "medloc", 0, [0.3, 0.45])
    assert read_metrics_jsonl(d / "metrics.jsonl", "curriculum/tau") == {1: 0.3, 2: 0.45}
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "x": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_metrics_jsonl(tmp_path / "bad.jsonl", "x")


def test_plot_curves_writes_png(tmp_path):
    runs = [_run(tmp_path, f"m{s}", "medloc", s, [0.3, 0.45, 0.55]) for s in range(2)]
    runs += [_run(tmp_path, f"f{s}", "vlm_r1", s, [0.5, 0.5]) for s in range(2)]
    out = plot_curves(runs, "curriculum/tau", tmp_path / "plots" / "tau.png", smooth=2)
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="logged 'loss/kl'"):
        plot_curves(runs, "loss/kl", tmp_path / "kl.png")
    assert not (tmp_path / "kl.png").exists()


def test_plot_acc_curves_writes_png(tmp_path):
    curves = {"MedLoc-R1": acc_curve([0.9, 0.8, 0.6, 0.2]),  # keys "0.50".."0.95"
              "VLM-R1": {0.5: 40.0, 0.75: 10.0, 0.95: 0.0}}
    out = plot_acc_curves(curves, tmp_path / "acc.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="empty"):
        plot_acc_curves({}, tmp_path / "none.png")
