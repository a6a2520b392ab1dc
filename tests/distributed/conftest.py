"""Shared fixture of the 2-process tests: one fixed rollout batch with hand-set advantages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medloc.data.dataset import GroundingDataset
from medloc.grpo.rollout import rollout
from medloc.models.loading import load_model, load_processor, vision_token_ids

# Adam's first step, lr * g / (|g| + eps), is blind to a constant factor on the gradient and
# amplifies float noise where |g| ~ eps = 1e-8: advantages scaled by 1e-8 keep every |g| well below
# eps, so the step is ~ (lr / eps) * g, linear in the gradient, scale included (test_zero3.py).
ADV_SCALE = 1e-8


@pytest.fixture(scope="module")
def rollout_batch(compose_cfg, tiny_model_dir, phantom_dataset, tmp_path_factory) -> Path:
    """A real rollout of the tiny model on 2 prompts (G=4), with advantages set by hand, saved."""
    cfg = compose_cfg()
    gc, ds = cfg.grpo, cfg.dataset
    processor = load_processor(tiny_model_dir, min_pixels=ds.min_pixels, max_pixels=ds.max_pixels)
    model = load_model(tiny_model_dir, attn_implementation=cfg.model.attn_implementation)
    data = GroundingDataset(Path(ds.dir) / f"{ds.train_split}.jsonl")
    samples = [data[0], data[1]]
    torch.manual_seed(0)
    ro = rollout(model, processor, [s.record for s in samples], [s.image for s in samples],
                 answer_format=cfg.reward.answer_format, num_generations=gc.num_generations,
                 temperature=gc.temperature, top_p=gc.top_p, max_new_tokens=gc.max_new_tokens,
                 suppress_token_ids=vision_token_ids(processor))
    assert ro.batch["input_ids"].shape[0] == 8
    adv = ADV_SCALE * torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N]
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save({"batch": ro.batch, "adv": adv}, path)
    return path
