"""DeepSpeed's CPU Adam is checked before anything loads (medloc/engine.py ``check_cpu_adam``,
``prepare_cpu_adam``; used with engine.offload_optimizer=true), with DeepSpeed's op builder and the
machine's toolchain stubbed:

- pre-built into DeepSpeed or already loaded: nothing to check;
- missing parts (the builder says incompatible, no ninja, no C++ compiler, no Python headers, and
  for a CUDA op builder on a GPU no nvcc): one RuntimeError naming engine.offload_optimizer, each
  missing part with how to get it, DS_BUILD_CPU_ADAM=1 and another engine;
- buildable: "cached" when torch's extension folder holds the built op, else "build", and then one
  console line says the ~1-2 min build is under way (rank 0 only).
"""

from __future__ import annotations

import pytest
from deepspeed.ops.op_builder.builder import CUDAOpBuilder, OpBuilder

from medloc import engine as eng


class FakeBuilder:
    name = "cpu_adam"

    def __init__(self, compatible: bool = True, error_log: str | None = None):
        self.compatible, self.error_log = compatible, error_log

    def is_compatible(self, verbose=False):
        return self.compatible


class FakeCudaBuilder(FakeBuilder, CUDAOpBuilder):
    """A DeepSpeed whose CPU Adam builder is a CUDA op builder (needs nvcc)."""

    def absolute_name(self):
        return "deepspeed.ops.adam.cpu_adam_op"

    def sources(self):
        return []


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine with every build tool, nothing built; returns a dict of switches to turn off."""
    import shutil
    import sysconfig

    from deepspeed import git_version_info
    from torch.utils import cpp_extension

    include = tmp_path / "include"
    include.mkdir()
    (include / "Python.h").write_text("")
    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    (cuda_home / "bin" / "nvcc").write_text("")
    state = {"ninja": True, "cxx": True, "include": include, "cuda_home": str(cuda_home)}
    monkeypatch.setitem(git_version_info.installed_ops, "cpu_adam", False)
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: state["ninja"])
    monkeypatch.setattr(shutil, "which", lambda cmd: "/usr/bin/" + cmd if state["cxx"] else None)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(state["include"])})
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", state["cuda_home"])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setenv("CXX", "c++")
    return state


def test_prebuilt_or_loaded_needs_no_toolchain(machine, monkeypatch):
    from deepspeed import git_version_info

    machine.update(ninja=False, cxx=False)
    monkeypatch.setitem(git_version_info.installed_ops, "cpu_adam", True)
    assert eng.check_cpu_adam(FakeBuilder(compatible=False)) == "installed"
    monkeypatch.setitem(git_version_info.installed_ops, "cpu_adam", False)
    monkeypatch.setitem(OpBuilder._loaded_ops, "cpu_adam", object())
    assert eng.check_cpu_adam(FakeBuilder(compatible=False)) == "loaded"


def test_missing_parts_are_named_with_what_to_do(machine, tmp_path, monkeypatch):
    machine.update(ninja=False, cxx=False, include=tmp_path / "nowhere")
    with pytest.raises(RuntimeError) as err:
        eng.check_cpu_adam(FakeBuilder(compatible=False, error_log="no AVX"))
    msg = str(err.value)
    for text in ["engine.offload_optimizer=true", "DeepSpeedCPUAdam",
                 "DeepSpeed's cpu_adam op says it is not compatible with this machine (no AVX)",
                 "ninja (pip install ninja)", "a C++ compiler ('c++' is not on PATH",
                 f"the Python headers ({tmp_path / 'nowhere' / 'Python.h'} does not exist",
                 "DS_BUILD_CPU_ADAM=1 pip install", "engine=zero3",
                 "engine.offload_optimizer=false"]:
        assert text in msg, (text, msg)
    assert "CUDA toolkit" not in msg  # DeepSpeed 0.19's CPU Adam is plain C++


def test_a_cuda_op_builder_on_a_gpu_needs_nvcc(machine, monkeypatch, tmp_path):
    builder = FakeCudaBuilder()
    assert eng.cpu_adam_missing(builder, cuda=True) == []
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "runtime_only"))
    missing = eng.cpu_adam_missing(builder, cuda=True)
    assert len(missing) == 1 and "a CUDA toolkit matching torch's CUDA" in missing[0]
    assert "has no bin/nvcc" in missing[0]
    assert eng.cpu_adam_missing(builder, cuda=False) == []  # no GPU: built for the CPU
    assert eng.cpu_adam_missing(FakeBuilder(), cuda=True) == []  # the CPU builder: no nvcc


def test_first_build_is_announced_once(machine, tmp_path, capsys):
    assert eng.prepare_cpu_adam(announce=True, builder=FakeBuilder()) == "build"
    assert capsys.readouterr().out == ("[engine] building DeepSpeed's CPU Adam once "
                                       "(engine.offload_optimizer=true), ~1-2 min; later runs "
                                       "reuse it\n")
    assert eng.prepare_cpu_adam(announce=False, builder=FakeBuilder()) == "build"
    assert capsys.readouterr().out == ""  # other ranks stay quiet
    (tmp_path / "extensions" / "cpu_adam" / "cpu_adam.so").write_text("")
    assert eng.prepare_cpu_adam(announce=True, builder=FakeBuilder()) == "cached"
    assert capsys.readouterr().out == ""


def test_the_real_builder_on_this_machine_is_checked_without_building(monkeypatch):
    """DeepSpeed's own builder and version info (the names the check reads exist in the pinned
    DeepSpeed): it answers -- installed, buildable, or what is missing -- and builds nothing."""
    try:
        state = eng.check_cpu_adam()
    except RuntimeError as err:
        assert "engine.offload_optimizer=true" in str(err)
    else:
        assert state in ("installed", "loaded", "cached", "build")
