"""Integration tests of the GRPO trainer (medloc/grpo/trainer.py) on the tiny Qwen2.5-VL, CPU, ZeRO-0.

- One update (``GRPOTrainer.update``) on a real rollout batch (``GRPOTrainer.sample``) with
  hand-set, non-zero advantages changes EVERY trainable parameter tensor of the policy, and no
  frozen one: with ``model.freeze_vision=true`` the vision tower is unchanged, and the reference
  model never moves.
  A random tiny model never earns a reward (all advantages would be 0 and nothing would move), so
  the advantages are set by hand instead of by the reward.
- With ``grpo.skip_dead_steps=true`` a step whose every group is dead (all advantages 0) leaves
  the weights and the optimizer untouched.
- Faults: an image that cannot be read at step 1 is skipped (another prompt takes its place),
  counted in ``data/skipped`` and named on stdout; a step without a finite loss leaves the weights
  untouched (even with Adam momentum from earlier steps), is counted, and a streak of
  ``trainer.max_bad_steps`` such steps stops the run with ``TrainingStopped``; one non-finite
  micro-batch among three is left out of the step (same update as zero advantages on its rows).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medloc import runtime
from medloc.data.dataset import GroundingDataset
from medloc.grpo import trainer as trainer_module
from medloc.grpo.trainer import GRPOTrainer, TrainingStopped

torch.set_num_threads(1)

# Adam's first step moves each element by ~lr * sign(grad): 1e-3 is far above float noise.
UPDATE_OVERRIDES = ["engine=zero0", "optim.lr=1e-3", "model.micro_batch_size=3"]


def _rollout(trainer: GRPOTrainer, step: int = 0):
    runtime.seed_step(trainer.cfg.seed, step, trainer.rank)  # as fit() does: reproducible
    records, images, problems = trainer.load_step_samples(step)
    assert problems == []
    return trainer.sample(records, images)


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
    metrics = trainer.update(ro.batch, adv, dead=0.0)
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
    metrics = trainer.update(ro.batch, torch.zeros(8), dead=1.0)
    assert metrics["train/skipped_dead_step"] == 1.0
    assert set(metrics) == {"train/skipped_dead_step", "time/reference_s"}
    assert all(torch.equal(before[n], p) for n, p in _snapshot(trainer.engine.module).items())
    # The optimizer never stepped: the next live update is Adam's first (no state yet).
    assert all(len(s) == 0 for s in trainer.engine.optimizer.state.values())


def test_unreadable_image_mid_run_is_skipped_and_counted(compose_cfg, tiny_model_dir,
                                                         phantom_dataset, tmp_path, capsys,
                                                         metrics_of):
    # Copy the data root: the records point at images under ../raw/ next to the dataset folder.
    src = Path(phantom_dataset.dir)
    shutil.copytree(src.parent, tmp_path / "data_root")
    data = tmp_path / "data_root" / src.name
    cfg = compose_cfg(["engine=zero0", f"dataset.dir={data}", "trainer.max_steps=2",
                       "trainer.save_every=0", "trainer.sample_every=1", "grpo.beta=0.0"])
    ds = GroundingDataset(data / f"{cfg.dataset.train_split}.jsonl")
    per_step = cfg.trainer.prompts_per_step
    first = runtime.step_indices(len(ds), 0, per_step, cfg.seed)
    second = runtime.step_indices(len(ds), 1, per_step, cfg.seed)
    bad_idx = second[0]
    assert bad_idx not in first  # readable at step 0, fails at step 1
    bad_path, bad_id = ds.image_path(bad_idx), ds.records[bad_idx].id
    Path(bad_path).write_bytes(b"this is not a PNG")

    run_dir = tmp_path / "run"
    GRPOTrainer(cfg, run_dir, str(tiny_model_dir)).fit()

    rows = metrics_of(run_dir)
    assert [r["data/skipped"] for r in rows] == [0.0, 1.0]
    assert f"[data] skipped unreadable image {bad_path}: cannot load image {bad_path}" in (
        capsys.readouterr().out)
    # Step 1 still trained on 2 prompts x G=4 completions, none of them the unreadable one.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    step1 = [s["id"] for s in samples if s["step"] == 1]
    assert len(step1) == 8 and len(set(step1)) == 2 and bad_id not in step1


def test_nonfinite_loss_skips_the_update_and_stops_after_a_streak(
        compose_cfg, tiny_model_dir, phantom_dataset, tmp_path, monkeypatch):
    cfg = compose_cfg([*UPDATE_OVERRIDES, "trainer.max_bad_steps=2"])
    trainer = GRPOTrainer(cfg, tmp_path, str(tiny_model_dir))
    ro = _rollout(trainer)
    adv = torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N]
    trainer.update(ro.batch, adv, dead=0.0)  # a good step: Adam now has momentum
    real_loss = trainer_module.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(trainer_module, "grpo_loss", nan_loss)
    before = _snapshot(trainer.engine.module)
    metrics = trainer.update(ro.batch, adv, dead=0.0)
    assert metrics["train/nonfinite_microbatches"] == 3.0  # 8 rows in micro-batches of 3
    assert trainer.nonfinite_total == 3 and trainer.bad_steps_in_row == 1
    moved = [n for n, p in _snapshot(trainer.engine.module).items() if not torch.equal(p, before[n])]
    assert moved == [], f"a step without a finite loss moved {moved[:5]}"
    with pytest.raises(TrainingStopped, match=r"2 steps in a row had a non-finite loss"):
        trainer.update(ro.batch, adv, dead=0.0)


def test_a_nonfinite_micro_batch_is_left_out_of_the_step(compose_cfg, tiny_model_dir,
                                                         phantom_dataset, tmp_path, monkeypatch):
    # beta = 0: a row's loss is adv * (token-mean ratio term) only, so leaving out micro-batch 1
    # (rows 3..5) gives the same gradient -- and the same Adam step -- as zero advantages there.
    cfg = compose_cfg([*UPDATE_OVERRIDES, "grpo.beta=0.0"])
    adv = torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N]
    zeroed = adv.clone()
    zeroed[3:6] = 0.0
    real_loss = trainer_module.grpo_loss
    calls = []

    def nan_second(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    results, ro = [], None
    for a, patch in [(adv, True), (zeroed, False)]:
        trainer = GRPOTrainer(cfg, tmp_path / str(patch), str(tiny_model_dir))
        ro = ro or _rollout(trainer)  # one rollout batch for both
        if patch:
            monkeypatch.setattr(trainer_module, "grpo_loss", nan_second)
        before = _snapshot(trainer.engine.module)
        metrics = trainer.update(ro.batch, a, dead=0.0)
        monkeypatch.undo()
        results.append((before, _snapshot(trainer.engine.module), metrics))
    (b0, p_nan, m_nan), (b1, p_zero, _) = results
    assert all(torch.equal(b0[n], b1[n]) for n in b0)  # same start
    assert m_nan["train/nonfinite_microbatches"] == 1.0
    # Adam's first step, lr * g / (|g| + 1e-8): 1% of lr covers float-order noise where g ~ 1e-8.
    worst = max((p_nan[n] - p_zero[n]).abs().max().item() for n in p_nan)
    assert worst < 1e-5, worst
    assert max((p_nan[n] - b0[n]).abs().max().item() for n in b0) > 5e-4  # it did update


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_update_with_cached_vision_features_equals_update_without(
        compose_cfg, tiny_model_dir, phantom_dataset, tmp_path, freeze_vision):
    """The sampler's image features stand in for the vision tower in the update (all forwards
    when the tower is frozen; the old-policy forward of mu=2 and, once per image, the reference
    otherwise; a trainable tower runs in the policy forward once per image per micro-batch):
    same parameters after the step as running the tower on every row in every forward, and the
    tower really sees fewer images (a hook counts the images of each call). Measured: bitwise
    equal with the frozen tower; with the trainable one the gradients differ by float rounding
    (tests/integration/test_update_vision_once.py compares them), the parameters after Adam's
    steps by 3.7e-6 (fp32, CPU)."""
    # the per-row forward (every row its own copy of the image without features); the
    # shared-prefix forward runs one row per prompt (tests/integration/test_shared_prefix.py)
    cfg = compose_cfg([*UPDATE_OVERRIDES, "grpo.mu=2", "grpo.shared_prefix_update=false",
                       f"model.freeze_vision={str(freeze_vision).lower()}"])
    adv = torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N], two groups of 4
    after, tower_calls = {}, {}
    for cached in (True, False):
        trainer = GRPOTrainer(cfg, tmp_path / f"cached_{cached}", str(tiny_model_dir))
        ro = _rollout(trainer)
        calls = []  # images per tower call (rows of grid_thw)
        towers = [trainer.engine.module.model.visual, trainer.engine.reference.model.visual]
        hooks = [t.register_forward_pre_hook(
            lambda _m, _a, kw, c=calls: c.append(int(kw["grid_thw"].shape[0])), with_kwargs=True)
            for t in towers]
        trainer.update(ro.batch, adv, dead=0.0,
                        image_features=ro.image_features if cached else None)
        for h in hooks:
            h.remove()
        after[cached], tower_calls[cached] = _snapshot(trainer.engine.module), calls
    worst = max((after[True][n] - after[False][n]).abs().max().item() for n in after[True])
    # Trainable tower: the gradients differ by float rounding (<= 1e-6 of a tensor's norm), and
    # Adam's step lr * g / (|g| + 1e-8) turns a rounding difference of ~1e-10 where |g| ~ 1e-8
    # into ~lr * 1e-3 (measured 3.7e-6 after mu=2 steps): 1% of lr bounds it, as in the tests above.
    tol = 1e-6 if freeze_vision else 1e-2 * 1e-3
    assert worst <= tol, f"parameters differ by up to {worst}"
    # 8 rows in micro-batches of 3 -> 3 micro-batches of 3, 3, 2 rows; mu=2 -> reference and
    # old policy per micro-batch, then the policy 2 x 3 calls, each with an image per row:
    # 8 + 8 + 16 = 32 images.
    assert tower_calls[False] == [3, 3, 3, 3, 2, 2] + [3, 3, 2] * 2
    # frozen: no tower at all; trainable: the reference once per image (2), then the policy once
    # per image per micro-batch (rows 0-2: image 0; 3-5: images 0, 1; 6-7: image 1), mu=2 times.
    assert tower_calls[True] == ([] if freeze_vision else [2] + [1, 2, 1] * 2)
