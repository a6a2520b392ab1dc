"""`python -m eval.table SWEEP_DIR` (eval.table) on a constructed sweep: 2 methods x 3 seeds with
per-sample predictions, plus an ablation arm, an unevaluated run and a broken run_info.json.
Checks seed aggregation, the paired tests against direct scipy / hand counts, the paper's numbers
beside ours, "—" for missing cells, and the Markdown / LaTeX / CSV files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from scipy import stats

from eval import paper_numbers as paper
from eval.table import build_table, discover_runs, main, render_markdown
from medloc.metrics import acc_at, pseudo_map

N_SAMPLES = 20


def _make_run(root: Path, arm: str, seed: int, ious: list[float],
              dataset: str = "phantom_ham10000") -> Path:
    d = root / f"{dataset}-{arm}-s{seed}"
    (d / "eval").mkdir(parents=True)
    (d / "run_info.json").write_text(json.dumps(
        {"dataset": dataset, "arm": arm, "seed": seed, "model": "tiny"}))
    metrics = {"acc@0.5": acc_at(ious, 0.5), "acc@0.8": acc_at(ious, 0.8),
               "pseudo_map": pseudo_map(ious)}
    (d / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (d / "eval" / "predictions.jsonl").write_text("".join(
        json.dumps({"id": f"img{i}", "iou": v}) + "\n" for i, v in enumerate(ious)))
    return d


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    # MedLoc-R1: seed s hits (IoU 0.9) on samples 0 .. 14+s -> Acc@0.5 = 75, 80, 85 %.
    for s in range(3):
        _make_run(root, "medloc", s, [0.9] * (15 + s) + [0.3] * (5 - s))
    # VLM-R1: IoU 0.6 on the first 10, 12, 11 samples -> Acc@0.5 = 50, 60, 55 %, Acc@0.8 = 0.
    for s, k in zip(range(3), (10, 12, 11)):
        _make_run(root, "vlm_r1", s, [0.6] * k + [0.1] * (N_SAMPLES - k))
    # A criteria-ablation arm with two seeds.
    for s in range(2):
        _make_run(root, "no_reward_check", s, [0.9] * 12 + [0.0] * 8)
    # An unevaluated run and a broken run_info.json: reported, not fatal.
    (root / "unfinished").mkdir()
    (root / "unfinished" / "run_info.json").write_text(json.dumps(
        {"dataset": "phantom_ham10000", "arm": "sft", "seed": 0, "model": "tiny"}))
    (root / "broken").mkdir()
    (root / "broken" / "run_info.json").write_text("{not json")
    return root


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_discover_runs(sweep_dir):
    sweep = discover_runs(sweep_dir)
    assert len(sweep.runs) == 8
    assert any("unfinished" in n and "no eval/metrics.json" in n for n in sweep.notes)
    assert any("broken" in n and "unreadable run_info.json" in n for n in sweep.notes)


def test_table1_aggregates_and_tests(sweep_dir, tmp_path):
    out = tmp_path / "tables"
    assert main([str(sweep_dir), "--out", str(out), "--table", "table1"]) == 0
    rows = {(r["row"], r["metric"]): r for r in _csv_rows(out / "table1.csv")
            if r["dataset"] == "phantom_ham10000"}

    ref = rows[("MedLoc-R1", "acc@0.5")]
    assert float(ref["mean"]) == pytest.approx(80.0) and float(ref["std"]) == pytest.approx(5.0)
    assert float(ref["paper"]) == paper.TABLE1[("ham10000", "acc@0.5")]["medloc"]  # 94.46
    assert ref["seeds"] == "0 1 2" and ref["ttest_p"] == ""  # the reference is not tested

    vlm = rows[("VLM-R1 (τ=0.5)", "acc@0.5")]
    assert float(vlm["mean"]) == pytest.approx(55.0) and float(vlm["std"]) == pytest.approx(5.0)
    # Paired t over seeds: VLM-R1 (50, 60, 55) vs MedLoc-R1 (75, 80, 85).
    expected = stats.ttest_rel([50.0, 60.0, 55.0], [75.0, 80.0, 85.0])
    # CSV values at the precision the tables print (p: 4 significant digits)
    assert float(vlm["ttest_p"]) == pytest.approx(expected.pvalue, rel=1e-3)
    assert vlm["mean"] == "55.00" and vlm["std"] == "5.00" and vlm["ttest_p"] == "0.01307"
    # Sign-flip test over images at 0.5, c_i = VLM-R1 hits - MedLoc-R1 hits over seeds 0, 1, 2.
    # MedLoc-R1 hits images 0..14 / 0..15 / 0..16, VLM-R1 images 0..9 / 0..11 / 0..10:
    # images 0..9 tie (3 - 3), image 10: 2 - 3 = -1, 11: 1 - 3 = -2, 12..14: 0 - 3 = -3 each,
    # 15: 0 - 2 = -2, 16: 0 - 1 = -1, 17..19 tie (0 - 0). T = -15 (the 15 discordant pairs of a
    # pooled McNemar), but from 7 untied images only: |T*| = 15 needs all 7 signs equal,
    # p = 2 / 2^7 = 0.015625 (pooled McNemar said 2 * 0.5^15 = 6e-5).
    assert vlm["signflip_seeds"] == "0 1 2" and int(vlm["signflip_n_images"]) == 20
    assert int(vlm["signflip_a_better"]) == 0 and int(vlm["signflip_b_better"]) == 7
    assert int(vlm["signflip_tied"]) == 13
    assert float(vlm["signflip_p"]) == pytest.approx(2 / 2**7, rel=1e-3)
    # At 0.8 VLM-R1 never hits; MedLoc-R1 hits images 0..14 in all 3 seeds (c = -3), image 15 in
    # 2 (c = -2), image 16 in 1 (c = -1): 17 untied images, all one way -> p = 2 / 2^17.
    vlm8 = rows[("VLM-R1 (τ=0.5)", "acc@0.8")]
    assert float(vlm8["mean"]) == 0.0
    assert int(vlm8["signflip_b_better"]) == 17
    assert float(vlm8["signflip_p"]) == pytest.approx(2 / 2**17, rel=1e-3)
    # pseudo-mAP has no single threshold: t-test only.
    assert rows[("VLM-R1 (τ=0.5)", "pseudo_map")]["signflip_p"] == ""

    # Missing method (SFT never evaluated): no values, paper number still there.
    sft = rows[("SFT", "acc@0.5")]
    assert sft["n_seeds"] == "0" and sft["mean"] == "" and float(sft["paper"]) == 90.31

    md = (out / "table1.md").read_text()
    # beside a phantom twin the paper's numbers (real data, 3B) are marked † and the caption says so
    assert "| phantom_ham10000 | Acc@0.5 | 80.00 ± 5.00 [94.46†] | — [90.31†] | 55.00 ± 5.00 [64.65†]" \
        in md
    assert "† the paper's result with Qwen2.5-VL-3B on the REAL dataset" in md
    # a phantom sweep shows only the twins it ran (no empty rows for the paper's other datasets)
    assert "| heel |" not in md and "| tn3k |" not in md
    # differences -25, -20, -30: t = -25 / (5 / sqrt 3) = -8.660 with 2 df -> p = 0.0131
    assert "| phantom_ham10000 | Acc@0.5 | — | t 0.013 / img 0.016 |" in md
    assert "img = exact sign-flip test over test images" in md
    assert "Notes:" in md and "unfinished" in md
    tex = (out / "table1.tex").read_text()
    assert r"\toprule" in tex and r"phantom\_ham10000" in tex and r"80.00 $\pm$ 5.00" in tex
    assert "VLM-R1 ($\\tau$=0.5)" in tex


def test_criteria_ablation_and_missing_rows(sweep_dir):
    table = build_table(discover_runs(sweep_dir), "criteria")
    by = {(e.row, e.metric): e for e in table.entries}
    full = by[("Full (all three checks)", "acc@0.5")]
    assert full.mean == pytest.approx(80.0) and full.paper == 94.96 and full.is_reference
    var = by[("w/o reward check", "acc@0.5")]
    assert var.values == [60.0, 60.0] and var.paper == 82.33
    # Paired over seeds 0, 1: differences 60 - 75 = -15 and 60 - 80 = -20: mean -17.5, sample sd
    # 3.5355, t = -17.5 / (3.5355 / sqrt 2) = -7.0 with 1 df.
    assert var.ttest.statistic == pytest.approx(-7.0, rel=1e-12)
    assert var.ttest.p_value == pytest.approx(2 * stats.t.sf(7.0, df=1), rel=1e-12)
    # Sign-flip over images, seeds 0, 1: variant hits images 0..11 in both; reference hits 0..14
    # and 0..15 -> images 12..14: c = 0 - 2 = -2, image 15: 0 - 1 = -1, the other 16 tie.
    # T = -7 = the most extreme value of 4 untied images: p = 2 / 2^4 = 0.125.
    assert var.image_test.detail == {"n_seeds": 2, "n_a_better": 0, "n_b_better": 4,
                                     "n_tied": 16, "seeds": [0, 1]}
    assert var.image_test.statistic == -7.0
    assert var.image_test.p_value == pytest.approx(0.125, rel=1e-12)
    assert var.image_test.effect == pytest.approx(-7 / 40)
    assert by[("w/o stability check", "acc@0.5")].values == []
    md = render_markdown(table)
    assert "| w/o stability check | — [89.72†] | — | — | — |" in md
    assert "60.00 ± 0.00 (n=2) [82.33†]" in md


@pytest.mark.parametrize("name", ["scale", "schedule", "decay", "refresh"])
def test_other_tables_never_crash(sweep_dir, tmp_path, name):
    out = tmp_path / name
    assert main([str(sweep_dir), "--out", str(out), "--table", name]) == 0
    for ext in ("md", "tex", "csv"):
        assert (out / f"{name}.{ext}").stat().st_size > 0


def test_empty_sweep_prints_paper_layout(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--table", "all"]) == 0
    out = capsys.readouterr().out
    assert "| ham10000 | Acc@0.5 | — [94.46] |" in out
    assert "| 32B | — | — [57.96] | — |" in out  # scale rows from the paper
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(
        f"{t}.{e}" for t in ("table1", "scale", "criteria", "schedule", "decay", "refresh")
        for e in ("md", "tex", "csv"))


def test_missing_sweep_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_scale_table_and_3b_only_paper_numbers(tmp_path):
    # HEEL runs of two model sizes (2 seeds each): 3B hits 12/20 (60 %), 7B hits 14/20 (70 %).
    root = tmp_path / "scale"
    for model, k in (("qwen2_5_vl_7b", 14), ("Qwen2.5-VL-3B-Instruct", 12)):
        for s in range(2):
            d = _make_run(root / model, "medloc", s, [0.9] * k + [0.0] * (N_SAMPLES - k),
                          dataset="heel")
            info = json.loads((d / "run_info.json").read_text())
            (d / "run_info.json").write_text(json.dumps({**info, "model": model}))
    sweep = discover_runs(root)
    md = render_markdown(build_table(sweep, "scale"))
    # Rows by size (3B, 7B), the paper's HEEL Acc@0.8 beside each, the 32B row from the paper.
    assert md.index("Qwen2.5-VL-3B-Instruct") < md.index("qwen2_5_vl_7b")
    assert "| Qwen2.5-VL-3B-Instruct | 60.00 ± 0.00 (n=2) | 60.00 ± 0.00 (n=2) [47.35] |" in md
    assert "| qwen2_5_vl_7b | 70.00 ± 0.00 (n=2) | 70.00 ± 0.00 (n=2) [57.83] |" in md
    assert "| 32B | — | — [57.96] | — |" in md
    # Table 1 is the paper's 3B table: no paper numbers beside the 7B runs.
    t1 = {(e.model, e.row, e.metric): e for e in build_table(sweep, "table1").entries}
    assert t1[("Qwen2.5-VL-3B-Instruct", "MedLoc-R1", "acc@0.8")].paper == 47.35
    assert t1[("qwen2_5_vl_7b", "MedLoc-R1", "acc@0.8")].paper is None


def test_image_test_leaves_out_images_missing_from_a_seed(tmp_path):
    root = tmp_path / "sweep"
    # Two seeds, 6 images; VLM-R1's seed-1 predictions lack img5 -> only img0..img4 are tested.
    for s in range(2):
        _make_run(root, "medloc", s, [0.9, 0.9, 0.9, 0.9, 0.1, 0.9])
    _make_run(root, "vlm_r1", 0, [0.9, 0.1, 0.1, 0.1, 0.1, 0.1])
    d = _make_run(root, "vlm_r1", 1, [0.9, 0.9, 0.1, 0.1, 0.1, 0.1])
    lines = (d / "eval" / "predictions.jsonl").read_text().splitlines()
    (d / "eval" / "predictions.jsonl").write_text("\n".join(lines[:5]) + "\n")
    sweep = discover_runs(root)
    table = build_table(sweep, "table1")
    e = next(e for e in table.entries if e.row == "VLM-R1 (τ=0.5)" and e.metric == "acc@0.5")
    # img0: 2 - 2 = 0; img1: 1 - 2 = -1; img2, img3: 0 - 2 = -2; img4: 0 - 0 = 0.
    # T = -5 from magnitudes {1, 2, 2}: |T*| >= 5 only when all three signs agree -> p = 2/8.
    assert e.image_test.n == 5 and e.image_test.detail["seeds"] == [0, 1]
    assert e.image_test.statistic == -5.0
    assert e.image_test.p_value == pytest.approx(0.25, rel=1e-12)
    assert any("1 test image(s) are missing" in n and "(5 used)" in n for n in table.notes)


def test_test_cell_shows_only_the_tests_that_ran():
    # Issue 20, finding 6: an n = 1 cell read "t — / img <0.001".
    from eval.cells import Entry
    from eval.render import _p_cell
    from eval.significance import TestResult

    def entry(ttest, image):
        return Entry("table1", "phantom_heel", "", "SFT", "sft", "acc@0.5", [0], [14.5], 94.46,
                     False, ttest, image)

    img = TestResult("sign_flip", -5.0, 0.0004, 200, -0.1, {"seeds": [0]})
    assert _p_cell(entry(None, img), "md") == "img <0.001 (1 seed)"
    t = TestResult("paired_t", -8.66, 0.0131, 3, -25.0, {})
    img3 = TestResult("sign_flip", -15.0, 0.0156, 20, -0.25, {"seeds": [0, 1, 2]})
    assert _p_cell(entry(t, img3), "md") == "t 0.013 / img 0.016"
    assert _p_cell(entry(None, None), "md") == "—"
