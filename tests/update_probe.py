"""One GRPO update of a trainer, observed: the first step's rollout, the gradient accumulated at
each accumulation boundary (before the optimizer steps on it), the parameters after the update,
and the weights put back afterwards so the next call starts from the same point. Used by the
tests that compare two ways of computing the update (tests/integration/test_shared_prefix.py,
tests/integration/test_update_vision_once.py). Not a test module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medloc import runtime
from medloc.grpo.trainer import GRPOTrainer


def first_rollout(trainer: GRPOTrainer) -> Any:
    """The rollout of step 0, seeded as the trainer seeds it."""
    runtime.seed_step(trainer.cfg.seed, 0, trainer.rank)
    records, images, problems = trainer.load_step_samples(0)
    assert problems == []
    return trainer.sample(records, images)


@dataclass
class ObservedUpdate:
    grads: list[dict[str, torch.Tensor]]  # per accumulation boundary: parameter name -> gradient
    start: dict[str, torch.Tensor]  # parameters before the update
    after: dict[str, torch.Tensor]  # parameters after it
    metrics: dict[str, float]


def one_update(trainer: GRPOTrainer, ro: Any, advantages: torch.Tensor, *,
               image_features: bool = True) -> ObservedUpdate:
    """``trainer.update`` on rollout ``ro`` with ``advantages`` [N] (and the rollout's image
    features unless ``image_features=False``), observed; the weights are restored afterwards."""
    engine = trainer.engine
    module = engine.module
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    grads: list[dict[str, torch.Tensor]] = []
    real_micro_step = engine.micro_step

    def capture(**kwargs):
        if engine.policy.is_gradient_accumulation_boundary():
            grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters()
                          if p.grad is not None})
        real_micro_step(**kwargs)

    engine.micro_step = capture  # an instance attribute over the method, removed below
    try:
        metrics = trainer.update(ro.batch, advantages, dead=0.0,
                                 image_features=ro.image_features if image_features else None)
    finally:
        del engine.micro_step
    after = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(start[n])
    return ObservedUpdate(grads, start, after, metrics)
