"""eval.mechanism: the sparsity and dead-group/τ-raise tables of a sweep, from its JSON files
(issue 20, finding 6: they were written by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from eval.mechanism import main


def _run(root: Path, arm: str, seed: int, dead: list[float], taus: list[float] | None) -> None:
    d = root / f"{arm}_s{seed}"
    (d / "eval").mkdir(parents=True)
    (d / "run_info.json").write_text(json.dumps(
        {"dataset": "phantom_heel", "arm": arm, "seed": seed, "model": "tiny-1m"}))
    (d / "eval" / "metrics.json").write_text(json.dumps({"acc@0.5": 10.0}))
    rows = []
    for s, frac in enumerate(dead):
        row = {"step": s, "reward/dead_group_frac": frac}
        if taus is not None:
            row["curriculum/tau"] = taus[s]
            row["curriculum/raised"] = float(s + 1 < len(taus) and taus[s + 1] > taus[s])
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tables_from_the_sweeps_json(tmp_path, capsys):
    (tmp_path / "sparsity_phantom_heel.json").write_text(json.dumps({
        "dataset": "phantom_heel", "prompts": 64, "G": 8, "mean_sampled_iou": 0.16341,
        "by_threshold": {"0.10": {"all_zero_frac": 0.125, "hit_rate": 0.5},
                         "0.50": {"all_zero_frac": 0.703125, "hit_rate": 0.1}}}))
    _run(tmp_path, "medloc", 0, [0.5, 0.25, 0.25, 0.0], [0.1, 0.1, 0.2, 0.2])  # raised after step 1
    _run(tmp_path, "medloc", 1, [0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1])
    _run(tmp_path, "raw_iou", 0, [0.0, 0.1, 0.0, 0.1], None)  # no threshold
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "mechanism.md").read_text()
    # 0.125 -> 12.5%, 0.703125 -> 70.3%
    assert "| phantom_heel | 12.5% | 70.3% | 0.163 |" in md
    # dead: mean (0.5+0.25+0.25+0)/4 = 0.25 and 0.5; τ 0.2 first used at step 2
    assert ("| phantom_heel (tiny-1m) | MedLoc-R1 | 0, 1 | 0.25 / 0.50 | 1 / 0 | "
            "s0: 0.1 →0.2@2; s1: 0.1 |") in md
    assert "| phantom_heel (tiny-1m) | Raw-IoU | 0 | 0.05 | — | — |" in md
    csv_lines = (tmp_path / "mechanism.csv").read_text().splitlines()
    assert "sparsity,phantom_heel,,,,no_hit_frac@0.50,0.703" in csv_lines
    assert "training,phantom_heel,tiny-1m,medloc,0,dead_group_frac,0.25" in csv_lines
    assert r"\toprule" in (tmp_path / "mechanism.tex").read_text()
    assert "Reward sparsity at the start" in capsys.readouterr().out


def test_empty_sweep_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no evaluated run and no sparsity_*.json" in capsys.readouterr().err
