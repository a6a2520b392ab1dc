"""Start-up faults of ``python -m medloc.train`` (medloc/train.py, medloc/config.py, medloc/prepare.py).

Each case checks that the run stops at once with a message that names the problem, and that it
wrote no metrics, checkpoints or run info (the real entry point in a subprocess, except the last
case, which calls ``medloc.train.run`` in-process to save a second ~10 s start-up):

Configuration mistakes end with one message and exit code 2, no traceback (medloc/cli_errors.py):

- an unknown key (Hydra/OmegaConf: the key is not in the dataclass schema): the node, the close
  matches and the node's valid keys, no ``+key`` advice; an unknown config group option, without
  the internal ``*_schema`` names,
- a value of the wrong type (OmegaConf conversion error naming the full key),
- a value out of range (the dataclass ``__post_init__`` check naming field, value and range),
- a model folder that does not exist (``build_tiny`` set or not: the tiny model is built only at its
  own cache location), or a missing ``init_from`` folder: nothing is created, and the message names
  what the folder must hold and how to get the weights.

Then what a command does with a run folder that already holds results (``medloc.runtime.
plan_run_folder``), in-process on one finished 2-step run (each test works on its own copy):

- the same configuration is skipped, also with keys that may differ (logger, checkpoint cadence,
  trainer.resume), and nothing in the folder changes;
- another configuration stops at start naming each differing key with both values, and nothing
  in the folder changes; a different trainer.max_steps without trainer.resume=true stops too;
- ``force=true`` reruns: the old results are gone, one metrics row per step, the new config stored;
- the same configuration, unfinished, without trainer.resume starts over (no duplicated rows);
- resume cannot go back before its newest checkpoint, and a progress-based curriculum (τ from
  t/max_steps) refuses a longer max_steps.
(Continuing to a larger max_steps and the new evaluation: tests/integration/test_resume.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest

BAD_CONFIG = [
    # issue 20, item 9: one message, no traceback, no "+key" advice; the node's valid keys
    ("trainer.max_stpes=3", [("config error: trainer.max_stpes: 'trainer' has no key 'max_stpes'. "
                              "Did you mean 'max_steps'"), "valid keys of 'trainer': "]),
    ("trainer.max_steps=abc", ["Value 'abc' of type 'str' could not be converted to Integer",
                               "full_key: trainer.max_steps"]),
    ("grpo.temperature=0", ["config error: grpo.temperature=0.0 must be a number in [1e-06, 10.0]"]),
    ("curriculum.tau0=0.9", ["config error: curriculum.tau0=0.9 must be < tau_target=0.8"]),
    ("dataset=nonexistent", ["config error: config group 'dataset' has no option 'nonexistent'",
                             "phantom_ham10000"]),
]


def _assert_nothing_written(run_dir):
    for name in ["metrics.jsonl", "run_info.json", "checkpoints", "final"]:
        assert not (run_dir / name).exists(), name


@pytest.mark.parametrize("override,messages", BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_fails_at_start(cli, tmp_path, override, messages):
    proc = cli([f"hydra.run.dir={tmp_path}", override], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]  # medloc.cli_errors.EXIT_CONFIG_ERROR
    for msg in messages:
        assert msg in proc.stderr, proc.stderr[-3000:]
    for noise in ["Traceback", "To append to your config", "Error executing job", "_schema",
                  "HYDRA_FULL_ERROR"]:
        assert noise not in proc.stderr, proc.stderr[-3000:]
    _assert_nothing_written(tmp_path)


def _assert_how_to(message: str, missing) -> None:
    assert f"model folder {missing} does not exist" in message, message[-3000:]
    assert "config.json" in message and "safetensors" in message  # what the folder must hold
    assert f"huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir {missing}" in message
    # never a random tiny model built into a path the user gave
    assert f"--out {missing}" not in message


def test_missing_model_builds_nothing_and_says_how_to_get_the_weights(cli, tmp_path):
    # Issue 20, finding 1, the exact command: debug=cpu_tiny keeps model.build_tiny=tiny-1m, yet a
    # model.path outside the tiny model's cache location is never built: exit != 0, nothing made.
    missing = tmp_path / "nonexistent"
    run_dir = tmp_path / "run"
    proc = cli([f"hydra.run.dir={run_dir}", "trainer.max_steps=2", f"model.path={missing}"],
               check=False, timeout=180)
    assert proc.returncode != 0
    _assert_how_to(proc.stderr, missing)
    assert "builds the random tiny model only at its cache location" in proc.stderr
    assert not missing.exists()  # nothing was built or downloaded there
    assert not (tmp_path / "nonexistent.lock").exists()
    _assert_nothing_written(run_dir)


def test_missing_init_from_fails_before_training(compose_cfg, tiny_model_dir, phantom_dataset,
                                                 tmp_path):
    # In-process (the CLI path above already shows Hydra reporting the message): the check runs
    # before the process group and the engine start.
    from medloc.train import run

    missing = tmp_path / "no_such_checkpoint"
    cfg = compose_cfg([f"init_from={missing}"])
    with pytest.raises(FileNotFoundError) as err:
        run(cfg, tmp_path / "run")
    _assert_how_to(str(err.value), missing)
    _assert_nothing_written(tmp_path / "run")


# -- a run folder that already holds results --------------------------------------------------

FINISHED = ["engine=zero0", "trainer.max_steps=2", "trainer.save_every=1", "trainer.eval_after=true",
            "dataset.max_eval_samples=2", "eval.batch_size=2"]


@pytest.fixture(scope="module")
def finished_run(compose_cfg, tiny_model_dir, phantom_dataset, tmp_path_factory):
    from medloc.train import run

    run_dir = tmp_path_factory.mktemp("finished") / "R"
    run(compose_cfg(FINISHED), run_dir)
    assert (run_dir / "eval" / "metrics.json").is_file()
    return run_dir


@pytest.fixture
def folder(finished_run, tmp_path):
    """A private copy of the finished run."""
    return shutil.copytree(finished_run, tmp_path / "R")


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


def _steps(run_dir):
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_configuration_is_skipped(compose_cfg, folder, capsys):
    from medloc.train import run

    before = _snapshot(folder)
    same = [*FINISHED, "logger.progress=true", "trainer.save_every=5", "trainer.keep_last=3",
            "trainer.resume=true"]  # keys that may differ (medloc.runtime.MAY_DIFFER)
    run(compose_cfg(same), folder)
    assert f"[skip] {folder} already has the results of this configuration" in capsys.readouterr().out
    assert _snapshot(folder) == before


@pytest.mark.parametrize("overrides,named", [
    (["optim.lr=1e-3", "grpo.beta=0.5"],
     ["optim.lr: 5e-05 (stored) -> 0.001 (this command)",
      "grpo.beta: 0.04 (stored) -> 0.5 (this command)", "differs in 2 key(s)"]),
    (["seed=7", "trainer.max_steps=4", "trainer.resume=true"],
     ["seed: 0 (stored) -> 7 (this command)", "trainer.max_steps: 2 (stored) -> 4 (this command)"]),
    (["trainer.max_steps=4"],  # a longer run asked for without trainer.resume=true
     ["holds results of trainer.max_steps=2; this command asks for trainer.max_steps=4",
      "trainer.resume=true continues the run to step 4"]),
], ids=["lr_beta", "seed_and_length", "length_without_resume"])
def test_other_configuration_stops_naming_the_keys(compose_cfg, folder, overrides, named):
    from medloc.runtime import RunFolderConflict
    from medloc.train import run

    before = _snapshot(folder)
    with pytest.raises(RunFolderConflict) as err:
        run(compose_cfg([*FINISHED, *overrides]), folder)
    for text in named:
        assert text in str(err.value), str(err.value)
    assert "force=true to delete its results and rerun" in str(err.value)
    assert _snapshot(folder) == before


def test_force_reruns_with_the_new_configuration(compose_cfg, folder, capsys, metrics_of):
    from medloc.train import run

    run(compose_cfg([*FINISHED, "optim.lr=1e-3", "force=true"]), folder)
    assert "force=true: removed metrics.jsonl" in capsys.readouterr().out
    assert _steps(folder) == [0, 1]  # rewritten, not appended
    assert [r["optim/lr"] for r in metrics_of(folder)] == [1e-3, 1e-3]  # the new run's rows
    stored = json.loads((folder / "resolved_config.json").read_text())
    assert stored["optim"]["lr"] == 1e-3 and stored["force"] is True
    assert (folder / "eval" / "metrics.json").is_file()
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_0000001",
                                                                         "step_0000002"]


def test_unfinished_run_without_resume_starts_over(compose_cfg, folder, capsys, metrics_of):
    from medloc.train import run

    old_rows = metrics_of(folder)
    for name in ["eval", "final", "checkpoints/step_0000002"]:  # as if killed during step 2's save
        shutil.rmtree(folder / name)
    run(compose_cfg([*FINISHED, "trainer.eval_after=false"]), folder)
    assert "trainer.resume=false: starting" in capsys.readouterr().out
    assert _steps(folder) == [0, 1]  # one row per step (the old rows were removed, not appended)
    assert [r["completion/length"] for r in metrics_of(folder)] == [
        r["completion/length"] for r in old_rows]  # the same run again
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_0000001",
                                                                         "step_0000002"]


def test_resume_cannot_go_back_and_progress_schedules_do_not_stretch(compose_cfg, folder):
    from medloc import runtime
    from medloc.train import progress_schedule, run

    with pytest.raises(runtime.RunFolderConflict, match="newest checkpoint is at step 2, past "
                                                        "trainer.max_steps=1"):
        run(compose_cfg([*FINISHED, "trainer.max_steps=1", "trainer.resume=true"]), folder)
    assert progress_schedule(compose_cfg(["curriculum=v_triune"]))
    assert progress_schedule(compose_cfg(["curriculum=fixed_moderate"]))
    assert not progress_schedule(compose_cfg(["curriculum=medloc"]))
    assert not progress_schedule(compose_cfg(["curriculum=v_triune", "method=sft"]))
    # (the plan alone: a finished v_triune run of the same configuration, asked to go longer)
    import dataclasses

    longer = dataclasses.asdict(compose_cfg([*FINISHED, "trainer.max_steps=4", "trainer.resume=true"]))
    with pytest.raises(runtime.RunFolderConflict, match="τ from t/T .* T=2; continuing to T=4"):
        runtime.plan_run_folder(folder, longer, progress_schedule=True)
