"""``python -m experiments.sweep`` (experiments/sweep.py), the command behind the Makefile's verbs.

- Every word a Makefile target passes is accepted (``make prepare`` once failed on ``prepare``), an
  unknown one is rejected naming the choices, and ``--dry-run`` only prints.
- ``prepare`` (embedded) builds the tiny models and the phantom datasets of every table and runs the
  stand-in pretraining; ``prepare --preset paper`` lists every missing model folder and dataset with
  the command that makes it, and exits 1; ``--tables table1`` checks only Table 1's inputs (the 3B,
  not the 7B and 32B of the scale table).
- A dry run says it ran nothing, and prints each command with the environment it reads
  (``MODEL_DIR``, ``OMP_NUM_THREADS``) and the data root, so a copied line reproduces the run; the
  paper preset's dry run checks the table's inputs first (exit 1 when some are missing).
- slow: the embedded Table 1 pipeline, shrunk to a few steps, end to end: stand-in SFT -> one Hydra
  multirun over every Table 1 arm (2 cells in parallel, joblib) -> evaluation -> table -> plots; then
  a rerun skips every finished cell, and a rerun with another configuration stops at the first cell
  it would misreport, naming the key. This is `make reproduce-table1 QUICK=1` with tiny budgets.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from experiments import sweep as sweep_cli

REPO = Path(__file__).resolve().parents[2]
ARMS = {"zero_shot", "sft", "vlm_r1", "v_triune_medloc_range", "raw_iou", "medloc"}


def _makefile_words() -> list[str]:
    """The first argument of every ``experiments.sweep`` call in the Makefile (loops expanded)."""
    text = (REPO / "Makefile").read_text()
    words = re.findall(r"experiments\.sweep (\w+)", text)
    for loop in re.findall(r"for t in ([\w ]+); do", text):
        words += loop.split()
    return words


def test_every_makefile_verb_parses_and_dry_run_only_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))  # prepare sets it for the runs
    words = _makefile_words()
    assert {"prepare", "table1", "scale", "ablations"} <= set(words)
    for word in dict.fromkeys([*words, *sweep_cli.TABLES]):  # + each ablation table alone
        dirs = [f"cache_dir={tmp_path / 'cache'}", f"data_root={tmp_path / 'data'}"]
        assert sweep_cli.main([word, "--dry-run", "--runs-dir", str(tmp_path / "runs"), "--", *dirs]) == 0
    out = capsys.readouterr().out
    # prepare lists what it would build, then the stand-in runs; cells continue their checkpoints
    assert f"== build model {tmp_path / 'cache'}/models/tiny-4m" in out
    assert f"== build dataset {tmp_path / 'data'}/phantom_tn3k-hard-n1000-s0" in out
    assert "experiment=standin model=tiny_4m" in out and "trainer.resume=true" in out
    # every ablation table ends with its counterfactual replay panel; Table 1 has none
    runs = tmp_path / "runs"
    for table in ("criteria", "schedule", "decay", "refresh"):
        assert f"eval.replay_panel {runs}/{table}_embedded --table {table}" in out
        # make reproduce-ablations: the four tables and panels from one sweep of 13 arms
        assert f"eval.table {runs}/ablations_embedded --table {table}" in out
        assert f"eval.replay_panel {runs}/ablations_embedded --table {table}" in out
    assert "== ablations_embedded: 39 cells" in out
    assert "replay_panel " + str(tmp_path / "runs") + "/table1" not in out
    assert not any(tmp_path.iterdir()), sorted(tmp_path.rglob("*"))  # nothing was built or run
    # a dry run says it ran nothing (no "done in 0.0 min"); each command carries its environment
    assert "== done in" not in out and "== dry run: nothing ran, nothing was written" in out
    assert f"$ MODEL_DIR={tmp_path / 'models'} OMP_NUM_THREADS=" in out


def test_unknown_word_is_rejected_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as err:
        sweep_cli.main(["bogus"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in message and "'prepare'" in message and "'table1'" in message


def test_an_explicit_resume_override_is_not_doubled():
    assert sweep_cli.resume_override(["seed=1"]) == ["trainer.resume=true"]
    assert sweep_cli.resume_override(["trainer.resume=false"]) == []


def test_prepare_builds_the_embedded_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    launched = []
    monkeypatch.setattr(sweep_cli, "run", lambda cmd, env, dry_run: launched.append(cmd))
    cache, data = tmp_path / "cache", tmp_path / "data"
    assert sweep_cli.main(["prepare", "--quick", "1", "--", f"cache_dir={cache}",
                           f"data_root={data}", "dataset.phantom.n_images=60"]) == 0
    for size in ["tiny-1m", "tiny-4m"]:  # tiny-4m: the scale table
        assert (cache / "models" / size / "config.json").is_file()
    # --quick: each table's first twin (phantom_ham10000; phantom_heel for the scale table)
    assert sorted(p.name for p in data.iterdir() if not p.name.endswith(".lock") and p.name != "raw") == [
        "phantom_ham10000-hard-n60-s0", "phantom_heel-hard-n60-s0"]
    for d in ["phantom_ham10000-hard-n60-s0", "phantom_heel-hard-n60-s0"]:
        assert (data / d / "train.jsonl").stat().st_size > 0 and (data / d / "test.jsonl").is_file()
    assert [c[c.index("experiment=standin") + 1] for c in launched] == ["model=tiny_1m", "model=tiny_4m"]
    assert all("trainer.resume=true" in c for c in launched)
    assert "2 model(s), 2 dataset(s) ready" in capsys.readouterr().out


def test_prepare_paper_lists_every_missing_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", "/unused")
    models, data = tmp_path / "models", tmp_path / "real"
    assert sweep_cli.main(["prepare", "--preset", "paper", "--model-dir", str(models),
                           "--data-root", str(data)]) == 1
    err = capsys.readouterr().err
    assert "6 input(s) missing or unusable" in err
    for name in ["Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-32B-Instruct"]:
        assert f"model folder {models / name} does not exist" in err
    for kind, raw in [("ham10000", "HAM10000"), ("heel", "HEEL"), ("tn3k", "TN3K")]:
        assert f"python -m data_prep.{kind} --src {data}/raw/{raw} --out {data}/{kind}" in err
    assert not models.exists() and not data.exists()  # checked, nothing made


def test_prepare_paper_checks_one_table_only(tmp_path, monkeypatch, capsys):
    # issue 20, item 11: Table 1's cells use the 3B only; the scale table's 7B and 32B are not asked
    monkeypatch.setenv("MODEL_DIR", "/unused")
    models, data = tmp_path / "models", tmp_path / "real"
    assert sweep_cli.main(["prepare", "--preset", "paper", "--tables", "table1", "--model-dir",
                           str(models), "--data-root", str(data)]) == 1
    err = capsys.readouterr().err
    assert "4 input(s) missing or unusable" in err, err
    assert f"model folder {models / 'Qwen2.5-VL-3B-Instruct'} does not exist" in err
    assert "7B" not in err and "32B" not in err, err
    with pytest.raises(SystemExit, match="unknown table"):
        sweep_cli.main(["prepare", "--preset", "paper", "--tables", "table9"])
    assert not models.exists() and not data.exists()


def test_paper_dry_run_checks_inputs_and_prints_reproducible_commands(tmp_path, monkeypatch,
                                                                      capsys):
    import shlex

    monkeypatch.setenv("MODEL_DIR", "/from/the/environment")
    models, data, runs = tmp_path / "models", tmp_path / "real", tmp_path / "runs"
    code = sweep_cli.main(["table1", "--preset", "paper", "--dry-run", "--model-dir", str(models),
                           "--data-root", str(data), "--runs-dir", str(runs)])
    captured = capsys.readouterr()
    assert code == 1  # the inputs are missing: listed, every command still printed
    assert "4 input(s) missing or unusable" in captured.err and "7B" not in captured.err
    multirun = [ln for ln in captured.out.splitlines() if "--multirun" in ln]
    assert len(multirun) == 1, captured.out
    words = shlex.split(multirun[0][2:])  # "$ " + the shell line
    assert words[0] == f"MODEL_DIR={models}" and words[1] == "OMP_NUM_THREADS=1"
    assert f"data_root={data}" in words and "preset=paper" in words
    assert "/from/the/environment" not in captured.out
    assert "== done in" not in captured.out and "nothing ran" in captured.out
    assert not tmp_path.joinpath("runs").exists() and not models.exists() and not data.exists()


def test_shell_line_round_trips_through_the_shell():
    import shlex

    cmd = ["python", "-m", "medloc.train", "hydra.run.dir=${cache_dir}/standin/${model.name}",
           "hydra.sweeper.params.arm='a,b'", "x=has space"]
    line = sweep_cli.shell_line(cmd, {"MODEL_DIR": "/m dir", "OMP_NUM_THREADS": "2", "HOME": "/h"})
    assert shlex.split(line) == ["MODEL_DIR=/m dir", "OMP_NUM_THREADS=2", *cmd]


@pytest.mark.slow
def test_embedded_table1_end_to_end_and_rerun_skips(table1_sweep) -> None:
    tmp_path, first = table1_sweep.tmp, table1_sweep.first  # the sweep: conftest.py
    sweep = tmp_path / "runs" / "table1_embedded"
    infos = [json.loads(p.read_text()) for p in sweep.rglob("run_info.json")]
    # QUICK: one twin (phantom_ham10000), one seed, every Table 1 arm of the embedded preset
    assert {i["arm"] for i in infos} == ARMS
    assert {i["dataset"] for i in infos} == {"phantom_ham10000"} and {i["seed"] for i in infos} == {0}
    for run in (p.parent for p in sweep.rglob("run_info.json")):
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert metrics["n"] == 6
        info = json.loads((run / "run_info.json").read_text())
        # every cell starts from the cached stand-in
        assert info["init_from"].endswith("standin/tiny-1m/final")
        if info["arm"] not in ("zero_shot", "sft"):
            steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert steps == [0, 1, 2]
    assert (tmp_path / "cache" / "standin" / "tiny-1m" / "final" / "config.json").is_file()

    rows = list(csv.DictReader((sweep / "table1.csv").open()))
    assert ARMS == {r["arm"] for r in rows}  # one column per arm that ran
    for name in ("dead_groups", "tau", "acc_curves"):
        assert (sweep / "plots" / f"phantom_ham10000_{name}.png").stat().st_size > 1000
    assert "Table 1" in first.stdout
    probe = json.loads((sweep / "sparsity_phantom_ham10000.json").read_text())
    assert probe["prompts"] == 8 and set(probe["by_threshold"]) == {"0.10", "0.30", "0.50", "0.75"}
    # the mechanism tables by command (eval.mechanism, run by experiments.plots): the probe's
    # sparsity and each arm's dead groups and τ raises
    mechanism = (sweep / "mechanism.md").read_text()
    assert "| phantom_ham10000 | " in mechanism and "no hit at τ = 0.5" in mechanism
    assert "| phantom_ham10000 (tiny-1m) | MedLoc-R1 | 0 |" in mechanism

    # an interrupted or repeated sweep continues: every finished cell is skipped
    second = table1_sweep.rerun()
    assert second.stdout.count("[skip]") + second.stderr.count("[skip]") >= len(ARMS) + 1

    # another configuration: the SFT stand-in, the zero-shot and the SFT cells never read grpo.*, so
    # they are still skipped; the first GRPO cell stops naming the key (one cell at a time, in order)
    third = table1_sweep.rerun(jobs=1, extra=("grpo.beta=0.5",), check=False)
    log = third.stdout + third.stderr
    assert third.returncode != 0
    assert log.count("[skip]") == 3, log[-4000:]
    assert "grpo.beta: 0.04 (stored) -> 0.5 (this command)" in log, log[-4000:]
    vlm_r1 = json.loads(next(p for p in sweep.rglob("vlm_r1/**/resolved_config.json")).read_text())
    assert vlm_r1["grpo"]["beta"] == 0.04  # the folder still describes its results
