"""Integration tests of the SFT baseline (medloc/sft.py) on the tiny Qwen2.5-VL, CPU, ZeRO-0.

- ``token_cross_entropy`` on hand-made logits (sum over supervised positions, and their count).
- The first loss of a random model is the per-token mean cross-entropy of a near-uniform
  prediction, ln(vocabulary size).
- A few SFT steps on one fixed batch (the train split cut to the batch size, so every step draws
  the same four examples) lower its loss at every step.
- The loss and the update do not depend on the micro-batch size (global token normalisation with
  gradient accumulation): micro-batches of 1 and of 4 give the same loss and the same weights.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medloc.data.collate import IGNORE_INDEX
from medloc.sft import SFTTrainer, token_cross_entropy

torch.set_num_threads(1)

FIXED_BATCH = ["method=sft", "engine=zero0", "dataset.max_train_samples=4",
               "trainer.sft_batch_size=4", "optim.lr=2e-3"]


def test_token_cross_entropy_hand_worked():
    # 2-token vocabulary, all logits 0 -> every position predicts p = 1/2, so -log p = ln 2.
    logits = torch.zeros(1, 3, 2)  # [n=1, T=3, V=2]
    # labels[:, t+1] is predicted at t: targets (1, 0) are supervised, labels[:, 0] is never used.
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    loss, count = token_cross_entropy(logits, labels)
    assert count.item() == 2
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-6)  # 2 * 0.693147 = 1.386294
    # A logit of +3 on the right token at t=0: -log(e^3 / (e^3 + 1)) = log(1 + e^-3) = 0.048587.
    logits[0, 0, 1] = 3.0
    loss, _ = token_cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3)) + math.log(2), abs=1e-6)


def test_sft_lowers_the_loss_on_a_fixed_batch(compose_cfg, tiny_model_dir, phantom_dataset,
                                              tmp_path):
    cfg = compose_cfg(FIXED_BATCH)
    trainer = SFTTrainer(cfg, tmp_path, str(tiny_model_dir))
    ids = [sorted(r.id for r in trainer.load_step_samples(s)[0]) for s in range(5)]
    assert all(x == ids[0] for x in ids) and len(ids[0]) == 4  # the same 4 examples every step
    losses = [trainer.train_step(s)["loss/sft"] for s in range(5)]  # loss before each update
    vocab = len(trainer.processor.tokenizer)
    # Random init: near-uniform next-token distribution, so the mean CE is ~ln V (ln 528 = 6.27).
    assert abs(losses[0] - math.log(vocab)) < 0.5, (losses[0], vocab)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 1.0, losses


def test_sft_is_invariant_to_the_micro_batch_size(compose_cfg, tiny_model_dir, phantom_dataset,
                                                  tmp_path):
    results = []
    for mb in (4, 1):
        cfg = compose_cfg([*FIXED_BATCH, f"model.micro_batch_size={mb}"])
        trainer = SFTTrainer(cfg, tmp_path / f"mb{mb}", str(tiny_model_dir))
        assert trainer.micro_steps == 4 // mb
        loss = trainer.train_step(0)["loss/sft"]
        params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
        results.append((loss, params))
    (loss4, p4), (loss1, p1) = results
    assert loss1 == pytest.approx(loss4, rel=1e-6)
    # Adam's first step moves an element by lr * g / (|g| + 1e-8): where g is ~1e-8 a summation-
    # order difference of ~1e-11 in g moves it by up to lr * 1e-11 / 1e-8 = 2e-6; 1% of lr bounds it.
    worst = max((p4[n] - p1[n]).abs().max().item() for n in p4)
    assert worst < 2e-5, worst
    moved = max((p4[n] - q).abs().max().item()
                for n, q in SFTTrainer(compose_cfg(FIXED_BATCH), tmp_path / "init",
                                       str(tiny_model_dir)).engine.module.named_parameters())
    assert moved > 1e-3  # the compared update is ~lr = 2e-3 per element, not nothing
