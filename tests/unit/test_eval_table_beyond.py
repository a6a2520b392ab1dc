"""The beyond-the-paper table (eval.table --table beyond, docs/beyond.md) on a constructed sweep:
MedLoc-R1 and its three new arms, 2 seeds; Acc@t with both tests against MedLoc-R1 in Table 1's
form, and the training side (dead-group fraction, raises, final τ) read from metrics.jsonl."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from eval.runs import discover_runs
from eval.table import main
from eval.table_spec import BEYOND_ROWS, build_table, training_summary

N = 20


def _run(root: Path, arm: str, seed: int, hits: int, dead: list[float], taus: list[float]) -> None:
    d = root / f"phantom_heel-{arm}-s{seed}"
    (d / "eval").mkdir(parents=True)
    (d / "run_info.json").write_text(json.dumps(
        {"dataset": "phantom_heel", "arm": arm, "seed": seed, "model": "tiny"}))
    ious = [0.9] * hits + [0.0] * (N - hits)
    (d / "eval" / "metrics.json").write_text(json.dumps(
        {"acc@0.5": 100 * hits / N, "acc@0.8": 100 * hits / N, "pseudo_map": 50.0}))
    (d / "eval" / "predictions.jsonl").write_text("".join(
        json.dumps({"id": f"img{i}", "iou": v}) + "\n" for i, v in enumerate(ious)))
    raises, lines = 0, []
    for step, (f, tau) in enumerate(zip(dead, taus)):
        raised = step + 1 < len(taus) and taus[step + 1] != tau
        raises += raised
        lines.append(json.dumps({"step": step, "reward/dead_group_frac": f, "curriculum/tau": tau,
                                 "curriculum/raised": float(raised), "curriculum/raises": raises}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "beyond"
    for s in range(2):
        _run(root, "medloc", s, 4 + s, [0.5, 0.25, 0.75], [0.1, 0.2, 0.2])  # mean dead 0.5, 1 raise
        _run(root, "medloc_hybrid", s, 6, [0.0, 0.25, 0.0], [0.1, 0.1, 0.2])  # 0.0833, 1 raise
        _run(root, "medloc_band", s, 5, [0.5, 0.5, 0.5], [0.1, 0.1, 0.1])  # 0.5, no raise
    # the calibrated arm ran one seed only, and not evaluated on the other: one seed in the table
    _run(root, "medloc_calibrated", 0, 4, [0.2, 0.2, 0.2], [0.15, 0.2, 0.25])  # 2 raises
    return root


def test_training_summary_by_hand(sweep):
    rows = {r.arm: r for r in training_summary(discover_runs(sweep))}
    assert [r for r in rows] == [a for _, a in BEYOND_ROWS]
    assert rows["medloc"].dead_group_frac == pytest.approx((0.5, 0.5))
    assert rows["medloc_hybrid"].dead_group_frac == pytest.approx((0.25 / 3, 0.25 / 3))
    assert rows["medloc"].raises == (1, 1) and rows["medloc_band"].raises == (0, 0)
    assert rows["medloc_calibrated"].seeds == (0,) and rows["medloc_calibrated"].raises == (2,)
    assert rows["medloc_calibrated"].final_tau == (0.25,)


def test_beyond_table_in_table1_form_with_both_tests(sweep, capsys):
    table = build_table(discover_runs(sweep), "beyond")
    assert table.layout == "wide" and {e.arm for e in table.entries} == {a for _, a in BEYOND_ROWS}
    ref = [e for e in table.entries if e.is_reference]
    assert {e.arm for e in ref} == {"medloc"} and all(e.paper is None for e in table.entries)
    hybrid = next(e for e in table.entries if e.arm == "medloc_hybrid" and e.metric == "acc@0.5")
    assert hybrid.values == [30.0, 30.0] and hybrid.ttest is not None
    assert hybrid.image_test is not None  # the sign-flip test over images
    assert main([str(sweep), "--table", "beyond"]) == 0
    md = (sweep / "beyond.md").read_text()
    assert "MedLoc-R1 + hybrid reward" in md and "Training: dead-group fraction" in md
    assert "| phantom_heel (tiny) | MedLoc-R1 | 0.50 ± 0.00 [0.50 / 0.50] | 1.0 ± 0.0 [1 / 1] |" in md
    with open(sweep / "beyond_training.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and rows[0]["arm"] == "medloc" and rows[0]["raises"] == "1"


def test_no_beyond_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--table", "beyond"]) == 1
    assert "no evaluated run of the beyond table's arms" in capsys.readouterr().err
