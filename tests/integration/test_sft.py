"""Integration tests of the SFT baseline (medloc/sft.py) on the tiny Qwen2.5-VL, CPU, ZeRO-0.

- ``supervised_positions`` and ``token_cross_entropy`` on hand-made labels and logits (the sum over
  supervised positions); the float32 chunks (``CE_CHUNK_ELEMENTS``) change no position's loss.
- The step computes logits only where there are labels: its loss and gradient equal those of
  the full-sequence logits (the step as it was: ``[n, T, V]`` logits, upcast to float32, one
  cross-entropy with ``ignore_index``) within 1e-6 relative (the gradient: of each tensor's
  norm), and no tensor of ``n * T * V`` elements is formed in the step, forward or backward (a
  ``TorchDispatchMode`` records every tensor an operator returns; the full-logits loss, run
  under the same recorder, is seen forming them).
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
from torch.utils._python_dispatch import TorchDispatchMode

from medloc import sft as sft_module
from medloc.data.collate import IGNORE_INDEX, model_inputs
from medloc.sft import SFTTrainer, supervised_positions, token_cross_entropy

torch.set_num_threads(1)

FIXED_BATCH = ["method=sft", "engine=zero0", "dataset.max_train_samples=4",
               "trainer.sft_batch_size=4", "optim.lr=2e-3"]


def test_token_cross_entropy_hand_worked():
    # 2-token vocabulary, all logits 0 -> every position predicts p = 1/2, so -log p = ln 2.
    # labels[:, t+1] is predicted at t: targets (1, 0) are supervised, labels[:, 0] is never used.
    labels = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, 1]])  # [n=2, T=3]
    keep, targets = supervised_positions(labels)
    assert keep.tolist() == [[True, True, False], [False, True, False]]
    assert targets.tolist() == [1, 0, 1]  # row-major: (0, t=0), (0, t=1), (1, t=1)
    logits = torch.zeros(3, 2)  # [M=3, V=2]
    assert token_cross_entropy(logits, targets).item() == pytest.approx(3 * math.log(2), abs=1e-6)
    # A logit of +3 on the right token at the first position: -log(e^3 / (e^3 + 1)) = 0.048587.
    logits[0, 1] = 3.0
    assert token_cross_entropy(logits, targets).item() == pytest.approx(
        math.log(1 + math.exp(-3)) + 2 * math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match=r"expected logits \[M, V\] and targets \[M\]"):
        token_cross_entropy(torch.zeros(1, 3, 2), targets)


@pytest.mark.parametrize("chunk_elements", [1, 2 * 11, 10**9])  # 1 position, 2, all
def test_token_cross_entropy_is_the_same_in_any_chunks(monkeypatch, chunk_elements):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g, dtype=torch.bfloat16).requires_grad_()  # [M, V]
    targets = torch.randint(0, 11, (5,), generator=g)
    monkeypatch.setattr(sft_module, "CE_CHUNK_ELEMENTS", chunk_elements)
    loss = token_cross_entropy(logits, targets)
    assert loss.dtype == torch.float32  # bf16 logits, float32 arithmetic
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits, targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad.float(), ref_grad.to(torch.bfloat16).float(), rtol=0, atol=0)


def _full_logits_loss(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SFT micro-batch loss sum as the step computed it before: every position's logits."""
    logits = model(**model_inputs(part), use_cache=False).logits  # [n, T, V]
    pred = logits[:, :-1].float()  # [n, T-1, V]
    return torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), part["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")


class _TensorShapes(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an operator returns while active."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append((tuple(t.shape), t.dtype))
        return out


def test_sft_step_takes_logits_only_where_there_are_labels(compose_cfg, tiny_model_dir,
                                                           phantom_dataset, tmp_path, monkeypatch):
    trainer = SFTTrainer(compose_cfg(FIXED_BATCH), tmp_path, str(tiny_model_dir))
    module = trainer.engine.module
    records, images, _ = trainer.load_step_samples(0)
    batch = trainer.encode(records, images)
    n, t = batch["input_ids"].shape
    vocab = module.config.text_config.vocab_size
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert trainer.micro_steps == 1 and n == 4 and 0 < supervised < n * (t - 1) // 4

    # Today's loss and gradient, computed directly (the mean over the batch's supervised tokens).
    params = [p for p in module.parameters() if p.requires_grad]
    old_loss = _full_logits_loss(module, batch) / supervised
    old_grads = torch.autograd.grad(old_loss, params)

    grads: dict[str, torch.Tensor] = {}
    real_micro_step = trainer.engine.micro_step

    def capture(**kwargs):  # the accumulated gradient, before the optimizer step
        grads.update({name: p.grad.detach().clone() for name, p in module.named_parameters()
                      if p.grad is not None})
        real_micro_step(**kwargs)

    monkeypatch.setattr(trainer.engine, "micro_step", capture)
    recorder = _TensorShapes()
    with recorder:
        metrics = trainer.train_step(0)
    monkeypatch.undo()

    assert metrics["loss/sft"] == pytest.approx(old_loss.item(), rel=1e-6)
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    assert set(grads) == set(names)
    worst = {name: float((grads[name] - g).norm() / g.norm().clamp_min(1e-30))
             for name, g in zip(names, old_grads) if g.abs().max() > 0}
    assert len(worst) > len(names) // 2  # most tensors get a gradient
    name = max(worst, key=worst.get)
    assert worst[name] <= 1e-6, f"{name}: gradient differs by {worst[name]:.2e} of its norm"

    # Logits (last dimension V; not lm_head's transposed weight [H, V]) of the supervised
    # positions only: M = supervised rows at most.
    full = n * (t - 1) * vocab  # elements of the float32 copy the step made before
    hidden = module.config.text_config.hidden_size
    logits_rows = [math.prod(s[:-1]) for s, _ in recorder.seen
                   if s and s[-1] == vocab and s != (hidden, vocab)]
    assert logits_rows and max(logits_rows) == supervised
    sequence_sized = {n * t * vocab, full}  # [n, T, V] logits, their [n, T-1, V] float32 copy

    def sequence_logits(seen):
        return [s for s, d in seen if d == torch.float32 and math.prod(s) in sequence_sized]

    assert sequence_logits(recorder.seen) == []
    # The control: the full-logits loss, under the same recorder, forms them.
    control = _TensorShapes()
    with control, torch.no_grad():
        _full_logits_loss(module, batch)
    assert (n, t, vocab) in sequence_logits(control.seen)


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
