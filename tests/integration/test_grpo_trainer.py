"""Integration tests of the GRPO trainer (medloc/grpo/trainer.py) on the tiny Qwen2.5-VL, CPU, ZeRO-0.

- One update (``GRPOTrainer._update``) on a real rollout batch with hand-set, non-zero advantages
  changes EVERY trainable parameter tensor of the policy, and no frozen one: with
  ``model.freeze_vision=true`` the vision tower is unchanged, and the reference model never moves.
  A random tiny model never earns a reward (all advantages would be 0 and nothing would move), so
  the advantages are set by hand instead of by the reward.
- With ``grpo.skip_dead_steps=true`` a step whose every group is dead (all advantages 0) leaves
  the weights and the optimizer untouched.
"""

from __future__ import annotations

import torch

from medloc.grpo.rollout import rollout
from medloc.grpo.trainer import GRPOTrainer

torch.set_num_threads(1)

# Adam's first step moves each element by ~lr * sign(grad): 1e-3 is far above float noise.
UPDATE_OVERRIDES = ["engine=zero0", "optim.lr=1e-3", "model.micro_batch_size=3"]


def _rollout(trainer: GRPOTrainer, step: int = 0):
    cfg, gc = trainer.cfg, trainer.cfg.grpo
    records, images, problems = trainer.load_step_samples(step)
    assert problems == []
    with trainer.engine.generation_context() as model:
        return rollout(
            model, trainer.processor, records, images, answer_format=cfg.reward.answer_format,
            num_generations=gc.num_generations, temperature=gc.temperature, top_p=gc.top_p,
            max_new_tokens=gc.max_new_tokens, suppress_token_ids=trainer.suppress,
        )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _update_and_compare(compose_cfg, tiny_model_dir, tmp_path, freeze_vision: bool):
    cfg = compose_cfg([*UPDATE_OVERRIDES, f"model.freeze_vision={str(freeze_vision).lower()}"])
    trainer = GRPOTrainer(cfg, tmp_path, str(tiny_model_dir))
    ro = _rollout(trainer)
    n = ro.batch["input_ids"].shape[0]
    # cpu_tiny: 2 prompts x G=4 = 8 rows; micro-batches of 3 -> 3 backward passes, 1 optimizer step.
    assert n == 8 and trainer.micro_steps == 3
    # Two groups of G=4, each zero-mean like real group-normalised advantages.
    adv = torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N]
    before = _snapshot(trainer.engine.module)
    ref_before = _snapshot(trainer.engine.reference)
    metrics = trainer._update(ro.batch, adv, dead=0.0)
    after = _snapshot(trainer.engine.module)
    assert metrics["train/nonfinite_microbatches"] == 0.0
    assert len(trainer.engine.optimizer.state) > 0  # Adam stepped (cf. the skip-dead test)
    trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    for name, p in _snapshot(trainer.engine.reference).items():
        assert torch.equal(p, ref_before[name]), f"reference parameter {name} moved"
    return trainable, changed, set(before)


def test_one_update_changes_every_trainable_parameter(compose_cfg, tiny_model_dir,
                                                      phantom_dataset, tmp_path):
    trainable, changed, names = _update_and_compare(compose_cfg, tiny_model_dir, tmp_path, False)
    assert trainable == names  # nothing frozen
    assert any(n.startswith("model.visual.") for n in names)
    unchanged = sorted(names - changed)
    assert unchanged == [], f"{len(unchanged)} trainable tensors did not move: {unchanged[:10]}"


def test_frozen_vision_tower_does_not_move(compose_cfg, tiny_model_dir, phantom_dataset, tmp_path):
    trainable, changed, names = _update_and_compare(compose_cfg, tiny_model_dir, tmp_path, True)
    vision = {n for n in names if n.startswith("model.visual.")}
    assert vision and trainable == names - vision
    assert changed & vision == set(), f"frozen vision tensors moved: {sorted(changed & vision)[:10]}"
    assert sorted(trainable - changed) == []


def test_skip_dead_steps_leaves_weights_untouched(compose_cfg, tiny_model_dir, phantom_dataset,
                                                  tmp_path):
    cfg = compose_cfg([*UPDATE_OVERRIDES, "grpo.skip_dead_steps=true"])
    trainer = GRPOTrainer(cfg, tmp_path, str(tiny_model_dir))
    ro = _rollout(trainer)
    before = _snapshot(trainer.engine.module)
    metrics = trainer._update(ro.batch, torch.zeros(8), dead=1.0)
    assert metrics == {"train/skipped_dead_step": 1.0}
    assert all(torch.equal(before[n], p) for n, p in _snapshot(trainer.engine.module).items())
    # The optimizer never stepped: the next live update is Adam's first (no state yet).
    assert all(len(s) == 0 for s in trainer.engine.optimizer.state.values())
