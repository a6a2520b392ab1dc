"""medloc/engine.py owns torch.distributed and the communication device.

- A scan of the source tree (medloc, eval, experiments, data_prep): no module but medloc/engine.py
  imports torch.distributed or reaches it as ``torch.distributed`` (an import, an attribute, an
  ``import_module`` string). The scanner is checked on snippets of each form, so it can fail.
- ``init_distributed`` on a GPU machine (torch.cuda and DeepSpeed's start stubbed):
  ``torch.cuda.set_device(LOCAL_RANK)`` runs BEFORE the process group starts, NCCL is the backend
  and cuda:LOCAL_RANK the communication device. At 62cf3b8 it never called set_device.
- Under NCCL the object collective and the barrier name that device (torch.distributed stubbed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from medloc import engine as eng

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("medloc", "eval", "experiments", "data_prep")
OWNER = "medloc/engine.py"


def distributed_uses(source: str) -> list[int]:
    """Line numbers where ``source`` imports or reaches torch.distributed."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            hit = any(a.name == "torch.distributed" or a.name.startswith("torch.distributed.")
                      for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            hit = (mod == "torch.distributed" or mod.startswith("torch.distributed.")
                   or (mod == "torch" and any(a.name == "distributed" for a in node.names)))
        elif isinstance(node, ast.Attribute):
            hit = (node.attr == "distributed" and isinstance(node.value, ast.Name)
                   and node.value.id == "torch")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            hit = node.value == "torch.distributed" or node.value.startswith("torch.distributed.")
        else:
            hit = False
        if hit:
            lines.append(node.lineno)
    return sorted(set(lines))


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist",
    "import torch.distributed",
    "from torch import distributed",
    "from torch.distributed import all_reduce",
    "from torch.distributed.elastic import x",
    "import torch\ntorch.distributed.barrier()",
    "import importlib\nimportlib.import_module('torch.distributed')",
])
def test_the_scanner_finds_each_form(snippet):
    assert distributed_uses(snippet), snippet


def test_the_scanner_ignores_the_rest():
    assert distributed_uses("import torch\nx = torch.cuda.is_available()\n"
                            "# torch.distributed in a comment\ny = 'Rayleigh-distributed'") == []


def test_only_the_engine_calls_torch_distributed():
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    assert len(files) > 50 and REPO / OWNER in files
    found = {str(p.relative_to(REPO)): distributed_uses(p.read_text()) for p in files}
    offenders = {f: lines for f, lines in found.items() if lines and f != OWNER}
    assert offenders == {}, f"torch.distributed outside {OWNER} (file: lines): {offenders}"
    assert found[OWNER]  # the owner does use it (the scan sees real imports)


def _gpu_start(monkeypatch, local_rank: int) -> list[tuple]:
    """A machine with GPUs, nothing started: record set_device and the process-group start."""
    calls: list[tuple] = []
    started = {"yes": False}
    monkeypatch.setattr(eng, "_COMM_DEVICE", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))

    def init(dist_backend):
        calls.append(("init_process_group", dist_backend))
        started["yes"] = True

    monkeypatch.setattr(eng.deepspeed, "init_distributed", init)
    monkeypatch.setattr(eng.dist, "is_initialized", lambda: started["yes"])
    monkeypatch.setattr(eng.dist, "get_rank", lambda: local_rank)
    monkeypatch.setattr(eng.dist, "get_world_size", lambda: 4)
    for k, v in {"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": "4",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(k, v)
    return calls


def test_set_device_runs_before_the_process_group_starts(monkeypatch):
    calls = _gpu_start(monkeypatch, local_rank=3)
    assert eng.init_distributed() == (3, 4)
    assert calls == [("set_device", 3), ("init_process_group", "nccl")]
    assert eng.comm_device() == torch.device("cuda", 3)
    eng.init_distributed()  # started once
    assert len(calls) == 2


def test_object_collectives_and_barrier_name_the_communication_device(monkeypatch):
    _gpu_start(monkeypatch, local_rank=2)
    eng.init_distributed()
    seen = []
    monkeypatch.setattr(eng.dist, "broadcast_object_list",
                        lambda box, src, device=None: seen.append(("objects", device)))
    monkeypatch.setattr(eng.dist, "barrier", lambda **kw: seen.append(("barrier", kw)))
    assert eng.broadcast_object("x") == "x"
    eng.barrier()
    assert seen == [("objects", torch.device("cuda", 2)), ("barrier", {"device_ids": [2]})]


def test_no_communication_device_before_the_group_starts(monkeypatch):
    monkeypatch.setattr(eng, "_COMM_DEVICE", None)
    with pytest.raises(RuntimeError, match="call medloc.engine.init_distributed"):
        eng.comm_device()
