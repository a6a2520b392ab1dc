"""The tests' NCCL rule (tests/distributed/nccl_rule.py) bites, and medloc.engine's collectives pass
it (medloc/engine.py, medloc/grpo/trainer.py, medloc/sft.py). In-process, one gloo process with the
world-size-1 shortcut off (``MEDLOC_FORCE_COLLECTIVES=1``), so every collective reaches
torch.distributed through the rule.

Each of the trainers' collective call sites of 62cf3b8 -- the GRPO step's IoU gather, its
``_global_means``, the update's global token and sequence counts, SFT's token count and loss total,
all CPU tensors -- is run twice: with the engine's functions as they were at 62cf3b8 (the tensor
handed straight to torch.distributed), which the rule refuses with NCCL's own message, as NCCL
does; and with today's engine, which copies it to the communication device and returns the
result on the caller's device and dtype. Object collectives and barriers are refused before the
communication device is bound. (The 2-process GRPO, SFT, resume and evaluation runs under the rule:
tests/distributed/test_zero3.py; the bind before the process group: tests/unit/test_collectives_owner.py.)
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nccl_rule import REFUSED, NcclRule

from medloc import engine as eng
from medloc.grpo.trainer import GRPOTrainer

torch.set_num_threads(1)

IGNORE = -100
FORCE = "MEDLOC_FORCE_COLLECTIVES"  # medloc.engine.FORCE_COLLECTIVES_ENV
CPU = torch.device("cpu")


# The engine's collectives as they were at 62cf3b8, minus the world-size-1 shortcut: the caller's
# tensor (a copy of it) goes straight to torch.distributed.
def old_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    eng.dist.all_reduce(out, op=eng.dist.ReduceOp.SUM)
    return out


def old_all_gather_1d(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(eng.dist.get_world_size())]
    eng.dist.all_gather(parts, t)
    return torch.cat(parts)


def old_broadcast_object(obj, src: int = 0):
    box = [obj]
    eng.dist.broadcast_object_list(box, src=src)
    return box[0]


MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])  # [N, L] a completion mask
LABELS = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 7, 8, IGNORE]])  # [n, T]

# name -> (the call as the trainer writes it, its value on one process)
CALL_SITES = {
    "grpo_iou_gather": (  # grpo/trainer.py train_step
        lambda: eng.all_gather_1d(torch.as_tensor(np.array([0.25, 0.5]), dtype=torch.float64)).numpy(),
        np.array([0.25, 0.5])),
    "grpo_global_means": (  # grpo/trainer.py GRPOTrainer._global_means itself
        lambda: GRPOTrainer._global_means(SimpleNamespace(world=2), {"a": 0.5, "b": 2.0}, weight=4),
        {"a": 0.5, "b": 2.0}),
    "grpo_update_tokens": (  # grpo/trainer.py update
        lambda: float(eng.all_reduce_sum(MASK.sum().double())), 3.0),
    "grpo_update_sequences": (
        lambda: float(eng.all_reduce_sum(torch.tensor(float(2), dtype=torch.float64))), 2.0),
    "sft_tokens": (  # sft.py train_step
        lambda: float(eng.all_reduce_sum((LABELS[:, 1:] != IGNORE).sum().double())), 4.0),
    "sft_loss_total": (
        lambda: float(eng.all_reduce_sum(torch.tensor(1.25, dtype=torch.float64))), 1.25),
}


@pytest.fixture
def rule(monkeypatch) -> NcclRule:
    """The rule on the engine of this process's (one-process, gloo) group, shortcut off."""
    eng.init_distributed()
    monkeypatch.setenv(FORCE, "1")
    rule = NcclRule().install(eng, setattr=monkeypatch.setattr)
    rule.assume_bound(CPU)  # gloo's communication device; the group may predate this test
    return rule


@pytest.mark.parametrize("site", CALL_SITES)
def test_the_62cf3b8_call_sites_are_refused_as_nccl_refuses_them(rule, monkeypatch, site):
    monkeypatch.setattr(eng, "all_reduce_sum", old_all_reduce_sum)
    monkeypatch.setattr(eng, "all_gather_1d", old_all_gather_1d)
    call, _ = CALL_SITES[site]
    with pytest.raises(RuntimeError, match=REFUSED):
        call()
    assert not rule.counts


@pytest.mark.parametrize("site", CALL_SITES)
def test_the_engine_collectives_pass_the_rule_and_return_on_the_callers_device(rule, site):
    call, expected = CALL_SITES[site]
    got = call()
    if isinstance(expected, np.ndarray):
        assert got.dtype == np.float64 and np.array_equal(got, expected)
        assert rule.counts == {"all_gather": 1}
    else:
        assert got == expected
        assert rule.counts == {"all_reduce": 1}  # it did go through torch.distributed


def test_results_keep_the_callers_device_dtype_and_are_new_tensors(rule):
    t = torch.tensor([1.5, 2.5], dtype=torch.float64)
    out = eng.all_reduce_sum(t)
    assert (out.device, out.dtype) == (t.device, t.dtype) and torch.equal(out, t)
    out.add_(1)
    assert torch.equal(t, torch.tensor([1.5, 2.5], dtype=torch.float64))  # t is untouched
    g = eng.all_gather_1d(torch.tensor([3, 4], dtype=torch.int64))
    assert g.dtype == torch.int64 and g.tolist() == [3, 4]


def test_object_collectives_and_barriers_need_the_bound_device(monkeypatch):
    eng.init_distributed()
    assert eng.comm_device() == CPU and eng.FORCE_COLLECTIVES_ENV == FORCE
    monkeypatch.setenv(FORCE, "1")
    rule = NcclRule().install(eng, setattr=monkeypatch.setattr)
    # Not bound (as on every rank at 62cf3b8: no set_device before the group started).
    with pytest.raises(RuntimeError, match="has not bound its communication device at all"):
        old_broadcast_object("run_dir")
    with pytest.raises(RuntimeError, match="has not bound"):
        eng.barrier()
    rule.bound, rule.bound_before_group = CPU, False
    with pytest.raises(RuntimeError, match="before the process group started"):
        eng.broadcast_object("run_dir")
    rule.assume_bound(CPU)
    assert eng.broadcast_object({"run": 1}) == {"run": 1}
    eng.barrier()
    with pytest.raises(RuntimeError, match=r"device=meta\) but the communication device is cpu"):
        eng.dist.broadcast_object_list(["x"], src=0, device=torch.device("meta"))
    assert rule.counts == {"broadcast_object_list": 1, "barrier": 1}


def test_torch_distributed_itself_is_left_alone(rule):
    """DeepSpeed calls torch.distributed directly: the rule does not see those calls."""
    t = torch.ones(2)
    torch.distributed.all_reduce(t)  # a CPU tensor nobody handed over, not through the engine
    assert rule.counts == {} and eng.dist is not torch.distributed
