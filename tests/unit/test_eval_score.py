"""`python -m eval.score PRED.jsonl` (eval.score): output file and content, malformed lines reported
with their line numbers and nothing written, the --out and --op options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.score import default_output_path, main
from medloc.metrics import read_predictions

REPO = Path(__file__).resolve().parents[2]

LINES = [
    {"id": "a", "pred_box": [0, 0, 10, 9], "gt_box": [0, 0, 10, 10]},  # IoU 0.9
    {"id": "b", "pred_box": [0, 0, 10, 6], "gt_box": [0, 0, 10, 10]},  # IoU 0.6
    {"id": "c", "pred_box": [0, 0, 10, 7.5], "gt_box": [0, 0, 10, 10]},  # IoU 0.75 exactly
    {"id": "d", "pred_box": None, "gt_box": [0, 0, 10, 10], "raw": "no box"},  # parse failure
]


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines))
    return path


def test_cli_writes_metrics_beside_file(tmp_path, capsys):
    pred = _write(tmp_path / "run1.jsonl", LINES)
    assert main([str(pred)]) == 0
    out = tmp_path / "run1.metrics.json"
    assert default_output_path(pred) == out
    metrics = json.loads(out.read_text())
    # Hits at 0.5: a, b, c -> 75 %; at 0.75: a, c -> 50 %; at 0.8: a -> 25 %.
    assert metrics["n"] == 4
    assert metrics["acc@0.5"] == 75.0 and metrics["acc@0.75"] == 50.0
    assert metrics["acc@0.8"] == 25.0
    assert metrics["mean_iou"] == pytest.approx((0.9 + 0.6 + 0.75) / 4)
    assert metrics["parse_fail_rate"] == 25.0
    assert json.loads(capsys.readouterr().out) == metrics
    # nothing else left behind (the temporary file was renamed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1.jsonl", "run1.metrics.json"]


def test_cli_strict_operator_and_out(tmp_path):
    pred = _write(tmp_path / "p.jsonl", LINES)
    out = tmp_path / "sub" / "m.json"
    assert main([str(pred), "--op", ">", "--out", str(out)]) == 0
    # Under ">" the exact 0.75 of sample c is a miss at 0.75: only a -> 25 %.
    assert json.loads(out.read_text())["acc@0.75"] == 25.0
    assert not (tmp_path / "p.metrics.json").exists()


def test_malformed_lines_reported_and_nothing_written(tmp_path, capsys):
    lines = [
        LINES[0],
        "{not json",                                                   # line 2
        "",                                                            # blank: fine
        {"id": "x", "pred_box": [1, 2, 3], "gt_box": [0, 0, 1, 1]},    # line 4
        {"id": "a", "pred_box": None, "gt_box": [0, 0, 1, 1]},         # line 5: duplicate id
        LINES[1],
    ]
    pred = _write(tmp_path / "bad.jsonl", lines)
    assert main([str(pred)]) == 1
    err = capsys.readouterr().err
    assert f"{pred}:2: not valid JSON" in err
    assert f"{pred}:4: 'pred_box' must be a list of 4 numbers" in err
    assert f"{pred}:5: duplicate id 'a' (first on line 1)" in err
    assert ":6:" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_empty_file_and_missing_file(tmp_path, capsys):
    empty = _write(tmp_path / "empty.jsonl", [""])
    assert main([str(empty)]) == 1
    assert "no prediction records" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_read_predictions_keeps_extra_keys(tmp_path):
    recs = read_predictions(_write(tmp_path / "p.jsonl", LINES))
    assert recs[3]["raw"] == "no box" and recs[3]["pred_box"] is None
    assert recs[0]["gt_box"] == [0.0, 0.0, 10.0, 10.0]


def test_module_entry_point(tmp_path):
    pred = _write(tmp_path / "p.jsonl", LINES)
    proc = subprocess.run([sys.executable, "-m", "eval.score", str(pred)], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["acc@0.5"] == 75.0
    assert (tmp_path / "p.metrics.json").is_file()


def test_inverted_and_empty_boxes_named_with_line_numbers_and_counted(tmp_path, capsys):
    # Issue 20, finding 8: x2 < x1 used to score IoU 0 without a word.
    lines = [LINES[0],
             {"id": "inv", "pred_box": [110, 220, 10, 20], "gt_box": [0, 0, 10, 10]},
             {"id": "flat", "pred_box": [5, 5, 5, 9], "gt_box": [0, 0, 10, 10]},
             LINES[3]]
    pred = _write(tmp_path / "p.jsonl", lines)
    assert main([str(pred)]) == 0
    err = capsys.readouterr().err
    assert f"{pred}:2: warning: inverted pred_box [110.0, 220.0, 10.0, 20.0] (id 'inv'" in err
    assert f"{pred}:3: warning: empty pred_box" in err
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    # 2 of 4 boxes inverted/empty (50 %), both IoU 0; the parse failure is counted apart (25 %).
    assert metrics["n_invalid_box"] == 2 and metrics["invalid_box_rate"] == 50.0
    assert metrics["parse_fail_rate"] == 25.0
    assert metrics["mean_iou"] == pytest.approx(0.9 / 4)


def test_confidence_on_some_boxes_only_names_the_line(tmp_path, capsys):
    lines = [{**LINES[0], "confidence": 0.9}, LINES[1], {**LINES[2], "confidence": 0.5}, LINES[3]]
    pred = _write(tmp_path / "p.jsonl", lines)
    assert main([str(pred)]) == 1
    err = capsys.readouterr().err
    assert f"{pred}:2: 'confidence' missing for a predicted box while 2 of 3" in err
    assert "(first on line 1)" in err
    assert not (tmp_path / "p.metrics.json").exists()
    # on none: fine, no COCO AP; on every predicted box (the parse failure needs none): COCO AP
    assert main([str(_write(tmp_path / "none.jsonl", LINES))]) == 0
    every = [{**ln, "confidence": 0.5} if ln["pred_box"] else ln for ln in LINES]
    assert main([str(_write(tmp_path / "all.jsonl", every))]) == 0
    assert "coco_ap" in json.loads((tmp_path / "all.metrics.json").read_text())
