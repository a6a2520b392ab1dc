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


# -- paper-ready plots (issue 20, finding 5): words, the tables' names, fixed colours ---------------

def test_every_ablation_and_table1_arm_has_its_own_colour():
    from eval.style import arm_style
    from eval.table_spec import ABLATION_TABLES, ablation_rows

    ablation_arms = {arm for t in ABLATION_TABLES for _, arm in ablation_rows(t)}
    assert len(ablation_arms) == 13  # the ablations sweep
    table1 = {"medloc", "sft", "vlm_r1", "v_triune", "v_triune_medloc_range", "raw_iou", "zero_shot"}
    from eval.style import ARM_ORDER, PALETTE

    assert len(PALETTE) >= len(ARM_ORDER) and len(set(PALETTE)) == len(PALETTE)
    beyond = {"medloc", "medloc_calibrated", "medloc_hybrid", "medloc_band"}
    for arms in (ablation_arms, table1, ablation_arms | table1, beyond, set(ARM_ORDER)):
        colours = [arm_style(a)["color"] for a in sorted(arms)]
        assert len(set(colours)) == len(colours), "two arms share a colour"
    # fixed: the same arm has the same style in every call (every figure, every process)
    assert arm_style("medloc") == {"color": "#1f77b4", "linestyle": "-"}
    assert arm_style("no_margin_check")["linestyle"] == "--"
    assert arm_style("my_new_arm") == arm_style("my_new_arm")


def test_names_are_the_tables_and_words():
    from eval.style import arm_label, fitted_upper, metric_label, seeds_note

    assert arm_label("v_triune_medloc_range") == "V-Triune (0.3/0.5/0.8)"
    assert arm_label("no_margin_check") == "w/o IoU-margin check"
    assert arm_label("refresh_none") == "Refresh: None (keep all)"
    assert arm_label("medloc_linear") == "Decay: Linear"
    assert arm_label("unknown_arm") == "unknown_arm"
    assert metric_label("reward/dead_group_frac").startswith("dead-group fraction")
    assert metric_label("curriculum/tau") == "IoU threshold τ"
    # 16 * 1.1 = 17.6 -> 20; 94 * 1.1 > 100 -> 100; nothing above 0 -> 5
    assert fitted_upper([3.0, 16.0]) == 20.0 and fitted_upper([94.0]) == 100.0
    assert fitted_upper([0.0]) == 5.0
    assert seeds_note({"a": 1, "b": 1}) == "n = 1 seed"
    assert seeds_note({"a": 3, "b": 3}) == "mean over 3 seeds"
    assert "n in the legend" in seeds_note({"a": 1, "b": 3})


def test_plot_curves_labels_and_colours(tmp_path, monkeypatch):
    from eval import plots

    seen = {}

    def keep(fig, out_png):
        ax = fig.axes[0]
        seen["title"], seen["ylabel"] = ax.get_title(), ax.get_ylabel()
        seen["lines"] = {ln.get_label(): ln.get_color() for ln in ax.get_lines()}
        seen["legend_outside"] = ax.get_legend().get_bbox_to_anchor().x0 > ax.bbox.x1 - 1
        seen["ylim"] = ax.get_ylim()
        return Path(out_png)

    monkeypatch.setattr(plots, "_save_atomic", keep)
    runs = [_run(tmp_path, "m0", "medloc", 0, [0.3, 0.45]),
            _run(tmp_path, "f0", "v_triune_medloc_range", 0, [0.3, 0.3])]
    plots.plot_curves(runs, "curriculum/tau", tmp_path / "tau.png")
    assert seen["ylabel"] == "IoU threshold τ"
    assert "n = 1 seed" in seen["title"] and "mean over" not in seen["title"]
    assert seen["lines"] == {"MedLoc-R1 (n = 1)": "#1f77b4", "V-Triune (0.3/0.5/0.8) (n = 1)": "#e377c2"}
    assert seen["legend_outside"]
    plots.plot_acc_curves({"medloc": {"0.50": 15.0, "0.95": 0.0}}, tmp_path / "a.png",
                          n_seeds={"medloc": 2})
    assert seen["ylim"] == (0.0, 20.0)  # fitted to data below 16, not 0-100
    assert "mean over 2 seeds" in seen["title"]


def test_plot_run_of_one_run(tmp_path):
    from eval.plots import plot_run

    d = _run(tmp_path, "demo", "medloc", 0, [0.1, 0.1, 0.2])
    (out,) = plot_run(d)
    assert out == d / "plots" / "training.png" and out.read_bytes()[:8] == PNG_MAGIC
