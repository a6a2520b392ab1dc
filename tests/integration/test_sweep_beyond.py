"""``python -m experiments.sweep beyond`` (make reproduce-beyond), dry run: each twin is probed and
calibrated before the cells; the calibrated arm runs per twin with the calibration's overrides, the
other arms as one multirun (their list one quoted sweeper value); then the beyond table and plots.
Nothing is built or run."""

from __future__ import annotations

import shlex

from experiments import sweep as sweep_cli


def test_beyond_dry_run_order_and_commands(tmp_path, capsys):
    runs = tmp_path / "runs"
    dirs = [f"cache_dir={tmp_path / 'cache'}", f"data_root={tmp_path / 'data'}"]
    assert sweep_cli.main(["beyond", "--dry-run", "--runs-dir", str(runs), "--", *dirs]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ ")]
    sweep = runs / "beyond_embedded"
    twins = ["phantom_ham10000", "phantom_heel", "phantom_tn3k"]
    probes = [i for i, ln in enumerate(lines) if "experiments.sparsity" in ln]
    calibrations = [i for i, ln in enumerate(lines) if "medloc.curriculum.calibrate" in ln]
    multiruns = [i for i, ln in enumerate(lines) if "--multirun" in ln]
    assert len(probes) == len(calibrations) == 3 and len(multiruns) == 4
    assert max(calibrations) < min(multiruns)  # every calibration before any cell
    for twin, i in zip(twins, probes):
        assert f"--out {sweep}/calibration/{twin}/probe.json" in lines[i]
        assert f"--checkpoint {tmp_path / 'cache'}/standin/tiny-1m/final" in lines[i]
    others = shlex.split(lines[multiruns[0]][2:])  # the printed command is shell-quoted
    assert "hydra.sweeper.params.arm='medloc,medloc_hybrid,medloc_band'" in others
    for twin, i in zip(twins, multiruns[1:]):
        assert "hydra.sweeper.params.arm=medloc_calibrated" in lines[i]
        assert f"hydra.sweeper.params.dataset={twin}" in lines[i]
        assert f"<curriculum.* from {sweep}/calibration/{twin}/curriculum.yaml>" in lines[i]
    assert any(f"eval.table {sweep} --table beyond" in ln for ln in lines)
    assert any(f"experiments.plots {sweep}" in ln for ln in lines)
    assert not any(tmp_path.iterdir())


def test_beyond_quick_calibrates_the_first_twin_only(tmp_path, capsys):
    dirs = [f"cache_dir={tmp_path / 'cache'}", f"data_root={tmp_path / 'data'}"]
    assert sweep_cli.main(["beyond", "--dry-run", "--quick", "1", "--runs-dir",
                           str(tmp_path / "runs"), "--", *dirs]) == 0
    out = capsys.readouterr().out
    assert out.count("experiments.sparsity") == 1 and "phantom_heel" not in out
    assert "== beyond_embedded: 4 cells" in out
    # the calibrated multirun names its one twin once (the quick dataset override is replaced)
    calibrated = [ln for ln in out.splitlines() if "params.arm=medloc_calibrated" in ln]
    assert len(calibrated) == 1 and calibrated[0].count("hydra.sweeper.params.dataset=") == 1
