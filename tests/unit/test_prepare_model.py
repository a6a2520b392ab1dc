"""medloc.prepare.ensure_model: the random tiny model is built only at its own cache location.

Issue 20, finding 1: a wrong ``model.path`` with ``model.build_tiny`` set used to create that folder
and write a random model into it. Now any path other than ``<cache_dir>/models/<size>`` must hold a
Hugging Face folder already; the error names the path, what it must hold and how to get it.
"""

from __future__ import annotations

import pytest

from medloc.config import ModelConfig
from medloc.prepare import ensure_model, tiny_model_home


@pytest.mark.parametrize("path,size,home", [
    ("cache/models/tiny-1m", "tiny-1m", True),
    ("/tmp/x/cache/models/tiny-4m", "tiny-4m", True),
    ("cache/models/tiny-1m", "tiny-4m", False),  # another size's folder
    ("/nonexistent", "tiny-1m", False),
    ("/data/models/Qwen2.5-VL-3B-Instruct", "tiny-1m", False),
    ("/data/tiny-1m", "tiny-1m", False),  # right name, not under models/
])
def test_tiny_model_home(path, size, home):
    assert tiny_model_home(path, size) is home


@pytest.mark.parametrize("name", ["nonexistent", "models/Qwen2.5-VL-3B-Instruct"])
def test_a_given_path_is_never_built(tmp_path, name):
    missing = tmp_path / name
    cfg = ModelConfig(path=str(missing), build_tiny="tiny-1m")
    with pytest.raises(FileNotFoundError) as err:
        ensure_model(cfg)
    msg = str(err.value)
    assert f"model folder {missing} does not exist" in msg
    assert "config.json" in msg and "safetensors" in msg
    assert "only at its cache location <cache_dir>/models/tiny-1m" in msg
    assert "--out" not in msg  # no suggestion to build a random model at the user's path
    assert not missing.exists() and not list(tmp_path.rglob("*.lock"))


def test_real_model_folder_without_weights_is_named(tmp_path):
    folder = tmp_path / "Qwen2.5-VL-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        ensure_model(ModelConfig(path=str(folder), build_tiny=None))
    assert f"model folder {folder} has no weights" in str(err.value)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in str(err.value)  # the checkpoint the folder is named for


def test_tiny_cli_refuses_a_folder_named_for_a_real_checkpoint(tmp_path, capsys):
    from medloc.models.tiny import main

    out = tmp_path / "Qwen2.5-VL-3B-Instruct"
    assert main(["--size", "tiny-1m", "--out", str(out)]) == 2
    assert "random weights" in capsys.readouterr().err
    assert not out.exists()


def test_missing_standin_says_how_to_build_it(tmp_path):
    from medloc.models.loading import resolve_model_path

    missing = tmp_path / "cache" / "standin" / "tiny-1m" / "final"
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path(missing)
    msg = str(err.value)
    assert f"model folder {missing} does not exist" in msg
    assert "python -m experiments.sweep standin" in msg
    assert "huggingface-cli" not in msg  # not a released checkpoint


def test_one_time_builds_are_announced(tmp_path, monkeypatch):
    from medloc import prepare

    monkeypatch.setattr(prepare, "torch_extension_built", lambda name: False)
    notes = prepare.one_time_builds(standin=tmp_path / "final", cuda=False)
    assert len(notes) == 2
    assert "stand-in" in notes[0] and "about 3 min" in notes[0]
    assert "deepspeed_shm_comm" in notes[1] and "1-2 min" in notes[1]
    # built already / a GPU machine: nothing to say
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    monkeypatch.setattr(prepare, "torch_extension_built", lambda name: True)
    assert prepare.one_time_builds(standin=tmp_path / "final", cuda=False) == []
    monkeypatch.setattr(prepare, "torch_extension_built", lambda name: False)
    assert prepare.one_time_builds(standin=None, cuda=True) == []
