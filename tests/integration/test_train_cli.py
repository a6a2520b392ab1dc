"""Start-up faults of ``python -m medloc.train`` (medloc/train.py, medloc/config.py, medloc/prepare.py).

Each case checks that the run stops at once with a message that names the problem, and that it
wrote no metrics, checkpoints or run info (the real entry point in a subprocess, except the last
case, which calls ``medloc.train.run`` in-process to save a second ~10 s start-up):

- an unknown key (Hydra/OmegaConf: the key is not in the dataclass schema),
- a value of the wrong type (OmegaConf conversion error naming the full key),
- a value out of range (the dataclass ``__post_init__`` check naming field, value and range),
- a model folder that does not exist and no ``build_tiny``, or a missing ``init_from`` folder:
  the message says how to get the weights (download command, or build the tiny model).
"""

from __future__ import annotations

import pytest

BAD_CONFIG = [
    ("trainer.bogus=1", ["Could not override 'trainer.bogus'", "Key 'bogus' not in 'TrainerConfig'"]),
    ("trainer.max_steps=abc", ["Value 'abc' of type 'str' could not be converted to Integer",
                               "full_key: trainer.max_steps"]),
    ("grpo.temperature=0", ["grpo.temperature=0.0 must be a number in [1e-06, 10.0]"]),
]


def _assert_nothing_written(run_dir):
    for name in ["metrics.jsonl", "run_info.json", "checkpoints", "final"]:
        assert not (run_dir / name).exists(), name


@pytest.mark.parametrize("override,messages", BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_fails_at_start(cli, tmp_path, override, messages):
    proc = cli([f"hydra.run.dir={tmp_path}", override], check=False, timeout=120)
    assert proc.returncode != 0
    for msg in messages:
        assert msg in proc.stderr, proc.stderr[-3000:]
    _assert_nothing_written(tmp_path)


def _assert_how_to(message: str, missing) -> None:
    assert f"model folder {missing} does not exist" in message, message[-3000:]
    assert f"huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir {missing}" in message
    assert f"python -m medloc.models.tiny --size tiny-1m --out {missing}" in message


def test_missing_model_says_how_to_get_the_weights(cli, tmp_path):
    missing = tmp_path / "no_such_model"
    run_dir = tmp_path / "run"
    proc = cli([f"hydra.run.dir={run_dir}", f"model.path={missing}", "model.build_tiny=null"],
               check=False, timeout=180)
    assert proc.returncode != 0
    _assert_how_to(proc.stderr, missing)
    assert not missing.exists()  # nothing was built or downloaded there
    _assert_nothing_written(run_dir)


def test_missing_init_from_fails_before_training(compose_cfg, tiny_model_dir, phantom_dataset,
                                                 tmp_path):
    # In-process (the CLI path above already shows Hydra reporting the message): the check runs
    # before the process group and the engine start.
    from medloc.train import run

    missing = tmp_path / "no_such_checkpoint"
    cfg = compose_cfg([f"init_from={missing}"])
    with pytest.raises(FileNotFoundError) as err:
        run(cfg, tmp_path / "run", {})
    _assert_how_to(str(err.value), missing)
    _assert_nothing_written(tmp_path / "run")
