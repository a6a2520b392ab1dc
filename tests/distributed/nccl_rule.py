"""A CPU stand-in for NCCL's device rules, for the gloo tests of medloc's collectives (not a test
module: tests/distributed/_worker.py installs it when ``MEDLOC_TEST_NCCL_RULE=1``, and
tests/distributed/test_nccl_rule.py in-process).

NCCL runs a collective only on CUDA tensors -- a CPU tensor fails with "No backend type associated
with device type cpu" -- and stages object collectives and barriers on the current CUDA device,
which is cuda:0 on every rank unless ``torch.cuda.set_device(local_rank)`` ran before. Gloo on a
CPU takes any CPU tensor at any time, so a CPU test sees neither fault. On a CPU the engine's
communication device and any other tensor's device are both ``cpu``, so the rule gives the
communication device an identity of its own: it records every tensor that medloc.engine hands to
it (``_to_comm``: a caller's tensor copied over; ``_comm_empty_like``: a result buffer) and when
the engine binds its communication device (``_bind_device``). Then, for every collective that
medloc.engine calls:

- a tensor collective (all_reduce, all_gather, broadcast, reduce_scatter, ...) handed any tensor
  the engine did not put on the communication device is refused with NCCL's own message;
- a barrier or object collective (broadcast_object_list, all_gather_object, ...) is refused unless
  the engine bound its communication device BEFORE the process group started, and one that names
  a device must name that one.

Which calls it checks: those medloc.engine makes, and only those. The rule replaces the engine's
binding of torch.distributed (the module attribute ``medloc.engine.dist``) by a checked view and
leaves torch.distributed itself as it is. DeepSpeed's own collectives (ZeRO's all-gathers and
reduce-scatters, its checkpoint barriers) and torch's inner calls (broadcast_object_list's
broadcasts) go to torch.distributed directly and are not checked: they put their tensors on
DeepSpeed's accelerator device themselves, which is what NCCL needs, and on a CPU that device is
the CPU, so a rule on torch.distributed's functions would refuse them for nothing (telling them
apart by their callers' frames would tie the rule to DeepSpeed's call stack). That every medloc
collective goes through the engine is what tests/unit/test_collectives_owner.py holds.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed

ENV = "MEDLOC_TEST_NCCL_RULE"
REFUSED = "No backend type associated with device type cpu"

# torch.distributed's collectives on tensors: name -> the tensors a call hands over
TENSOR_OPS: dict[str, Callable[..., list[torch.Tensor]]] = {
    "all_reduce": lambda tensor, *a, **k: [tensor],
    "broadcast": lambda tensor, *a, **k: [tensor],
    "reduce": lambda tensor, *a, **k: [tensor],
    "all_gather": lambda tensor_list, tensor, *a, **k: [*tensor_list, tensor],
    "all_gather_into_tensor": lambda output_tensor, input_tensor, *a, **k: [output_tensor,
                                                                            input_tensor],
    "reduce_scatter": lambda output, input_list, *a, **k: [output, *input_list],
    "reduce_scatter_tensor": lambda output, input, *a, **k: [output, input],
    "all_to_all_single": lambda output, input, *a, **k: [output, input],
}
# Staged on the current device under NCCL: object collectives (their `device` argument) and barrier.
OBJECT_OPS = ("broadcast_object_list", "all_gather_object", "gather_object",
              "scatter_object_list")


class NcclRule:
    """The rule's state: the tensors handed to the communication device, the bound device, and
    how many calls of each collective passed (``counts``)."""

    def __init__(self) -> None:
        self._handed: dict[int, weakref.ref] = {}
        self.bound: torch.device | None = None
        self.bound_before_group: bool | None = None
        self.counts: Counter[str] = Counter()

    # -- what the engine does -----------------------------------------------------------------

    def handed(self, t: torch.Tensor) -> torch.Tensor:
        self._handed[id(t)] = weakref.ref(t)
        return t

    def is_handed(self, t: torch.Tensor) -> bool:
        ref = self._handed.get(id(t))
        return ref is not None and ref() is t

    def assume_bound(self, device: torch.device) -> None:
        """For an in-process test whose process group started before the rule was installed."""
        self.bound, self.bound_before_group = torch.device(device), True

    def install(self, engine: ModuleType, setattr: Callable[[Any, str, Any], None] = setattr
                ) -> NcclRule:
        """Record the engine's hand-overs and bind, and check its collectives (``setattr``: e.g.
        pytest's ``monkeypatch.setattr``, to undo it after a test)."""
        for name in ("_to_comm", "_comm_empty_like"):
            if hasattr(engine, name):
                original = getattr(engine, name)
                setattr(engine, name, lambda *a, _f=original, **k: self.handed(_f(*a, **k)))
        if hasattr(engine, "_bind_device"):
            bind = engine._bind_device

            def recording_bind(*args: Any, **kwargs: Any) -> torch.device:
                before = not torch.distributed.is_initialized()
                device = bind(*args, **kwargs)
                self.bound, self.bound_before_group = torch.device(device), before
                return device

            setattr(engine, "_bind_device", recording_bind)
        setattr(engine, "dist", CheckedDist(self))
        return self

    # -- the checks ----------------------------------------------------------------------------

    def check_tensors(self, op: str, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            if not self.is_handed(t):
                raise RuntimeError(
                    f"{REFUSED} (the tests' NCCL rule: torch.distributed.{op} was handed a "
                    f"{t.device} tensor that medloc.engine did not put on its communication device)")
        self.counts[op] += 1

    def check_bound(self, op: str, device: Any = None) -> None:
        if self.bound is None or not self.bound_before_group:
            when = "at all" if self.bound is None else "before the process group started"
            raise RuntimeError(
                f"the tests' NCCL rule: torch.distributed.{op} while medloc.engine has not bound its "
                f"communication device {when}: under NCCL it is staged on the current CUDA device, "
                "cuda:0 on every rank (torch.cuda.set_device(local_rank) must come first)")
        if device is not None and torch.device(device) != self.bound:
            raise RuntimeError(
                f"the tests' NCCL rule: torch.distributed.{op}(device={device}) but the "
                f"communication device is {self.bound}")
        self.counts[op] += 1

    def write(self, path: Path) -> None:
        """The counts of checked calls that passed, as JSON (the tests read them)."""
        Path(path).write_text(json.dumps(dict(sorted(self.counts.items())), indent=1))


class CheckedDist:
    """torch.distributed as medloc.engine sees it under the rule: collectives checked, anything
    else (is_initialized, get_rank, ReduceOp, ...) passed through."""

    def __init__(self, rule: NcclRule) -> None:
        self._rule = rule

    def __getattr__(self, name: str) -> Any:
        real = getattr(torch.distributed, name)
        rule = self._rule
        if name in TENSOR_OPS:
            def checked(*args: Any, **kwargs: Any) -> Any:
                rule.check_tensors(name, TENSOR_OPS[name](*args, **kwargs))
                return real(*args, **kwargs)
            return checked
        if name in OBJECT_OPS:
            def checked_object(*args: Any, **kwargs: Any) -> Any:
                rule.check_bound(name, kwargs.get("device"))
                return real(*args, **kwargs)
            return checked_object
        if name == "barrier":
            def checked_barrier(*args: Any, **kwargs: Any) -> Any:
                ids = kwargs.get("device_ids")
                rule.check_bound(name, torch.device("cuda", ids[0]) if ids else None)
                return real(*args, **kwargs)
            return checked_barrier
        return real
