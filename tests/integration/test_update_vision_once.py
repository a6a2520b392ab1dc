"""A trainable vision tower runs once per image in the GRPO update (medloc/grpo/trainer.py
``update``, medloc/models/logprobs.py ``prompt_image_features``); tiny Qwen2.5-VL, fp32, CPU,
ZeRO-0, ``model.freeze_vision=false``.

The policy forward computes each image's features once, with grad, per micro-batch, and hands
them to the image's G rows; the gradients of all rows flow back into that one tower forward.
Today's path (``update(..., image_features=None)``: the tower inside every row's forward, each row
its own copy of the image) is the baseline:

- the gradient of one update (all micro-batches accumulated, read at the accumulation boundary
  before the optimizer step) equals the baseline's, tensor by tensor, within 1e-6 relative to
  that tensor's gradient norm (``||g_new - g_old|| <= 1e-6 ||g_old||``; measured: at most
  5.7e-7, in the vision tower's patch embedding, whose gradient sums every patch of every row;
  the largest single element differs by 1.2e-6 of the tensor's largest element), the tower's
  tensors included; micro-batches of 3 rows (groups of G=4 split across micro-batches, a
  micro-batch with two images) and of 8 (one micro-batch, two whole groups);
- that difference is rounding, not arithmetic: in float64 (the HF model directly,
  ``completion_logprobs`` with the features of ``prompt_image_features`` against the tower in
  every row's forward) the log-probs agree within 1e-12 (measured: bit for bit) and the gradients
  within 1e-7 of each tensor's norm (the float32 steps Qwen2.5-VL keeps in float64, see
  ``F64_GRAD_TOL``);
- the tower sees each image once per micro-batch that needs it (a hook counts the images its
  forward takes): 1 + 2 + 1 = 4 images for micro-batches of 3, 2 for 8, where the baseline
  runs 8 (one per row);
- with ``model.gradient_checkpointing=true`` the tower's blocks are checkpointed in that
  forward too (each block's MLP runs again in the backward: 2 calls per tower forward, 1
  without checkpointing).
"""

from __future__ import annotations

import pytest
import torch

from medloc import generation as gen
from medloc.data.collate import slice_batch
from medloc.grpo.trainer import GRPOTrainer
from medloc.models.loading import load_model, vision_tower
from medloc.models.logprobs import completion_logprobs, prompt_image_features, prompts_of_rows
from tests import update_probe

torch.set_num_threads(1)

ADV = torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N], two groups of G=4
REL_TOL = 1e-6
# Qwen2.5-VL computes RMSNorm and the rotary embedding in float32 whatever the model's dtype
# (modeling_qwen2_5_vl.py), so in float64 the gradient that the G rows send to the one tower
# forward is still rounded to float32 once where today each row's is rounded alone: float32's
# 6e-8 per element (measured: 4.2e-8 of a tensor's gradient norm at most).
F64_GRAD_TOL = 1e-7


def _trainer(compose_cfg, tiny_model_dir, tmp_path, overrides):
    # the per-row forward (grpo.shared_prefix_update=false), whose baseline runs the tower on
    # every row; the shared-prefix forward: tests/integration/test_shared_prefix.py
    cfg = compose_cfg(["engine=zero0", "optim.lr=1e-3", "model.freeze_vision=false",
                       "grpo.shared_prefix_update=false", *overrides])
    return GRPOTrainer(cfg, tmp_path, str(tiny_model_dir))


def _count_tower_images(trainer: GRPOTrainer) -> tuple[list[int], object]:
    """Images through the POLICY's tower, per forward (grid_thw rows: one per image)."""
    seen: list[int] = []

    def hook(_module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        seen.append(int(grid.shape[0]))

    return seen, vision_tower(trainer.engine.module).register_forward_pre_hook(hook,
                                                                             with_kwargs=True)


def _update_gradient(trainer: GRPOTrainer, ro, *, per_image: bool):
    """One update from the trainer's current weights (weights put back afterwards): the
    accumulated gradient at the boundary (before the optimizer step), the update's metrics and
    the images per policy tower forward."""
    images, handle = _count_tower_images(trainer)
    try:
        update = update_probe.one_update(trainer, ro, ADV, image_features=per_image)
    finally:
        handle.remove()
    grads = {n: g for boundary in update.grads for n, g in boundary.items()}  # the last wins
    return grads, update.metrics, images


@pytest.mark.parametrize("micro_batch", [3, 8])
def test_tower_once_per_image_gives_todays_gradient(compose_cfg, tiny_model_dir, phantom_dataset,
                                                    tmp_path, micro_batch):
    trainer = _trainer(compose_cfg, tiny_model_dir, tmp_path,
                       [f"model.micro_batch_size={micro_batch}"])
    ro = update_probe.first_rollout(trainer)
    assert ro.batch["input_ids"].shape[0] == 8 and trainer.cfg.grpo.num_generations == 4
    new, new_metrics, new_images = _update_gradient(trainer, ro, per_image=True)
    old, old_metrics, old_images = _update_gradient(trainer, ro, per_image=False)

    # The baseline: one image per row through the tower, in every micro-batch.
    assert old_images == ([3, 3, 2] if micro_batch == 3 else [8])
    # Once per image per micro-batch: rows 0-2 show image 0, rows 3-5 images 0 and 1, rows 6-7
    # image 1; one micro-batch of 8 rows holds both groups.
    assert new_images == ([1, 2, 1] if micro_batch == 3 else [2])

    trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert set(new) == set(old) == trainable
    vision = {n for n in trainable if n.startswith("model.visual.")}
    assert vision and all(old[n].abs().max() > 0 for n in vision)  # the tower gets a gradient
    worst = {n: float((new[n] - old[n]).norm() / old[n].norm()) for n in trainable}
    name = max(worst, key=worst.get)
    assert worst[name] <= REL_TOL, f"{name}: gradient differs by {worst[name]:.2e} of its scale"
    for key in ("loss/policy", "loss/kl"):
        assert new_metrics[key] == pytest.approx(old_metrics[key], rel=REL_TOL, abs=1e-12), key


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_per_image_tower_is_checkpointed_when_asked(compose_cfg, tiny_model_dir,
                                                        phantom_dataset, tmp_path, checkpointing):
    """transformers checkpoints a vision block's forward when ``gradient_checkpointing`` and
    training: the backward runs it again, so a pre-hook on each block's MLP counts 2 calls per
    tower forward with checkpointing and 1 without (tests/integration/test_train_mode.py)."""
    trainer = _trainer(compose_cfg, tiny_model_dir, tmp_path,
                       ["model.micro_batch_size=3",
                        f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    ro = update_probe.first_rollout(trainer)
    tower = vision_tower(trainer.engine.module)
    calls = [0] * len(tower.blocks)
    handles = [block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(tower.blocks)]
    try:
        _, _, images = _update_gradient(trainer, ro, per_image=True)
    finally:
        for h in handles:
            h.remove()
    assert images == [1, 2, 1]  # three tower forwards (micro-batches of 3 rows)
    assert calls == [len(images) * (2 if checkpointing else 1)] * len(tower.blocks), calls


def test_prompts_of_rows():
    # G=4: rows 3..5 show prompts 0 (row 3) and 1 (rows 4, 5); rows 0..7 prompts 0 and 1.
    assert prompts_of_rows(range(3, 6), 4) == range(2)
    assert prompts_of_rows(range(3), 4) == range(1)
    assert prompts_of_rows(range(6, 8), 4) == range(1, 2)
    assert prompts_of_rows(range(8), 4) == range(2)
    with pytest.raises(ValueError, match="non-empty contiguous range"):
        prompts_of_rows(range(2, 2), 4)


def test_per_image_features_are_exact_in_float64(compose_cfg, tiny_model_dir, phantom_dataset,
                                                 tmp_path):
    """Rows of a rollout batch (all 8; 3..5, which a group boundary splits; 6..7): log-probs and
    the gradient of a weighted sum of them, with the tower run once per image of these rows (its
    features handed to each row) and with the tower in the forward on every row's own copy of the
    image; float64, so the comparison sees the arithmetic, not float32 rounding."""
    trainer = _trainer(compose_cfg, tiny_model_dir, tmp_path, [])
    ro = update_probe.first_rollout(trainer)
    g = trainer.cfg.grpo.num_generations
    kw = {"temperature": trainer.cfg.grpo.temperature, "suppress_token_ids": trainer.suppress}
    model = load_model(tiny_model_dir, dtype="float32", attn_implementation="sdpa").double().train()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in ro.batch.items()}

    def run(rows: range, per_image: bool):
        part = slice_batch(batch, rows.start, rows.stop)
        weights = torch.randn(part["completion_mask"].shape, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(0))  # [n, L]
        model.zero_grad()
        feats = None
        if per_image:
            prompts = prompts_of_rows(rows, g)
            per_prompt = prompt_image_features(model, batch, prompts, g)
            first = prompts.start * g
            feats = gen.rows_features(per_prompt, range(rows.start - first, rows.stop - first), g)
        logp = completion_logprobs(model, part, image_features=feats, **kw)  # [n, L]
        (logp * weights * part["completion_mask"]).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for rows in (range(8), range(3, 6), range(6, 8)):
        (logp_new, grad_new), (logp_old, grad_old) = run(rows, True), run(rows, False)
        torch.testing.assert_close(logp_new, logp_old, rtol=0, atol=1e-12)
        assert any(n.startswith("model.visual.") and grad_old[n].abs().max() > 0 for n in grad_old)
        worst = {n: float((grad_new[n] - grad_old[n]).norm() / grad_old[n].norm())
                 for n in grad_old}
        name = max(worst, key=worst.get)
        assert worst[name] <= F64_GRAD_TOL, f"rows {rows}, {name}: {worst[name]:.2e}"
