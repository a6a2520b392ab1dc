"""eval.summary: the few lines `make demo` ends with (steps as metrics.jsonl numbers them, the τ
path at the first step trained at each new τ, reward at the start and the end, the evaluation,
where the files are), also appended to train.log."""

from __future__ import annotations

import json
from pathlib import Path

from eval.summary import main, summarize


def _run(root: Path) -> Path:
    d = root / "demo"
    (d / "eval").mkdir(parents=True)
    (d / "run_info.json").write_text(json.dumps({
        "dataset": "phantom_ham10000", "arm": "", "method": "grpo", "seed": 0,
        "init_from": "cache/standin/tiny-1m/final"}))
    (d / "resolved_config.json").write_text(json.dumps({"curriculum": {"schedule": "medloc"}}))
    # τ 0.1 for steps 0-3; the decision after step 3 raises it: 0.2 from step 4 on
    rows = [{"step": s, "time/step_s": 1.0, "curriculum/tau": 0.1 if s < 4 else 0.2,
             "curriculum/raised": float(s == 3), "reward/mean": 1.0 + 0.1 * s,
             "reward/dead_group_frac": 0.5} for s in range(10)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval" / "metrics.json").write_text(json.dumps({
        "acc@0.5": 12.0, "acc@0.75": 1.0, "pseudo_map": 3.25, "mean_iou": 0.31, "n": 100,
        "parse_fail_rate": 0.0, "invalid_box_rate": 1.0}))
    (d / "train.log").write_text("")
    return d


def test_summary_lines(tmp_path):
    text = summarize(_run(tmp_path))
    assert "grpo (medloc curriculum) on phantom_ham10000, seed 0" in text
    assert "10 (step 0 to 9, as metrics.jsonl numbers them)" in text
    assert "0.1 →0.2@4  (1 raise;" in text
    # mean of steps 0-4: 1.2; of steps 5-9: 1.7
    assert "1.200 mean of the first 5 steps → 1.700 of the last 5" in text
    assert "Acc@0.5 12.0 %" in text and "mean IoU 0.310" in text and "inverted/empty boxes 1.0 %" in text
    assert "eval metrics" in text


def test_cli_draws_plots_and_appends_to_train_log(tmp_path, capsys):
    d = _run(tmp_path)
    assert main([str(d)]) == 0
    assert (d / "plots" / "training.png").is_file()
    assert "τ path" in (d / "train.log").read_text()
    assert main([str(tmp_path / "nothing")]) == 1
    assert "not a run folder" in capsys.readouterr().err


def test_pick_run_chooses_the_arm_and_says_what_there_is(tmp_path):
    import pytest

    from eval.runs import pick_run

    for arm, seed, ds in [("vlm_r1", 0, "phantom_heel"), ("medloc", 1, "phantom_heel"),
                          ("medloc", 0, "phantom_tn3k"), ("medloc", 0, "phantom_heel")]:
        d = tmp_path / f"{arm}_{ds}_{seed}"
        (d / "eval").mkdir(parents=True)
        (d / "run_info.json").write_text(json.dumps(
            {"dataset": ds, "arm": arm, "seed": seed, "model": "tiny-1m"}))
        (d / "eval" / "metrics.json").write_text("{}")
        (d / "ious.jsonl").write_text('{"step": 0, "ious": [0.5]}\n')
    # the arm asked for (not the first ious.jsonl found), first dataset by name, lowest seed
    run = pick_run(tmp_path, "medloc")
    assert (run.arm, run.dataset, run.seed) == ("medloc", "phantom_heel", 0)
    assert pick_run(tmp_path, "medloc", "phantom_heel", 1).seed == 1
    with pytest.raises(ValueError, match=r"no run of arm='v_triune'.*medloc/phantom_heel/s0"):
        pick_run(tmp_path, "v_triune")
