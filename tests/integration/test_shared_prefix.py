"""The shared-prefix update (``grpo.shared_prefix_update``, medloc/models/logprobs.py
``shared_prefix_logprobs``): each prompt through the language model once per micro-batch, its G
completions over that prompt's keys/values. Tiny Qwen2.5-VL, fp32, CPU, ZeRO-0.

The baseline is the per-row forward (``completion_logprobs``: every row's prompt + completion):

- log-probs within 1e-6 (policy in train mode with grad, the reference, the old policy; the
  rollout's left-padded prompts of different lengths, completions ending at different steps);
  rows that a micro-batch boundary splits from their group (rows 3..5 of two groups of 4) too;
- one GRPO update (reference KL, mu = 2 so the old-policy forward runs, micro-batches of 3 and
  8 rows) leaves every parameter within 1e-6 of the per-row update's;
- gradient checkpointing stays active in both of its forwards (each decoder layer's MLP entered
  again in the backward), with the gradient of the unchecked forward;
- ``grpo.shared_prefix_update=false`` runs the per-row forward only (the arithmetic before it).
"""

from __future__ import annotations

import pytest
import torch

from medloc.data.collate import slice_batch
from medloc.grpo.trainer import GRPOTrainer
from medloc.models import logprobs as lp
from medloc.models.loading import enable_checkpointing, load_model
from medloc.models.logprobs import completion_logprobs, row_groups, shared_prefix_logprobs
from tests import update_probe

torch.set_num_threads(1)

TOL = 1e-6
GRAD_TOL = (1e-5, 5e-5)  # fp32 update, per optimizer step (see the test)
# Qwen2.5-VL computes RMSNorm and the rotary embedding in float32 whatever the model's dtype, so
# in float64 rounding of float32 size remains (tests/integration/test_update_vision_once.py).
F64_GRAD_TOL = 1e-7
ADV = torch.tensor([1.5, -0.5, 0.5, -1.5, -1.0, 1.0, 0.25, -0.25])  # [N], two groups of G=4


def _trainer(compose_cfg, tiny_model_dir, tmp_path, overrides=()):
    cfg = compose_cfg(["engine=zero0", "optim.lr=1e-3", "grpo.beta=0.04", *overrides])
    return GRPOTrainer(cfg, tmp_path, str(tiny_model_dir))


def _shorter_prompts(batch, rows: range, k: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` with the first ``k`` prompt tokens of ``rows`` turned into left padding (pad id,
    mask 0, position 0): prompts of different lengths in one left-padded batch (the cpu_tiny
    rollout's prompts have equal lengths)."""
    out = {key: v.clone() for key, v in batch.items()}
    r = slice(rows.start, rows.stop)
    out["input_ids"][r, :k] = pad_id
    out["attention_mask"][r, :k] = 0
    out["position_ids"][r, :, :k] = 0
    return out


def _lengths_differ(batch) -> None:
    """The rollout exercises what the shared forward must get right: left padding that differs
    between prompts, and completions of different lengths."""
    length = batch["completion_mask"].shape[1]
    prompt_mask = batch["attention_mask"][:, :-length]  # [N, P]
    assert len(set(prompt_mask.sum(1).tolist())) > 1, "prompts of equal length: no left padding"
    assert len(set(batch["completion_mask"].sum(1).tolist())) > 1, "completions of equal length"


def test_row_groups():
    assert row_groups(range(8), 4) == ([0, 4], [4, 4])
    assert row_groups(range(3, 6), 4) == ([0, 1], [1, 2])  # row 3 of prompt 0, rows 4-5 of 1
    assert row_groups(range(6, 8), 4) == ([0], [2])


def test_logprobs_equal_the_per_row_forward(compose_cfg, tiny_model_dir, phantom_dataset,
                                            tmp_path):
    trainer = _trainer(compose_cfg, tiny_model_dir, tmp_path)
    ro = update_probe.first_rollout(trainer)
    g = trainer.cfg.grpo.num_generations
    assert ro.batch["input_ids"].shape[0] == 8 and g == 4
    batch = _shorter_prompts(ro.batch, range(4), 3, trainer.processor.tokenizer.pad_token_id)
    feats = ro.image_features
    _lengths_differ(batch)
    kw = {"temperature": trainer.cfg.grpo.temperature, "suppress_token_ids": trainer.suppress}
    models = {"policy": trainer.policy_module(), "reference": trainer.engine.reference,
              "old policy": trainer.engine.module}
    for rows in (range(8), range(3, 6), range(6, 8)):
        part = slice_batch(batch, rows.start, rows.stop)
        prompts = list(feats[rows.start // g: (rows.stop - 1) // g + 1])
        for name, model in models.items():
            grad = name == "policy"
            with torch.set_grad_enabled(grad):
                old = completion_logprobs(model, part, **kw)  # [n, L]
                new = shared_prefix_logprobs(model, part, rows, g, **kw)  # [n, L]
                with_feats = shared_prefix_logprobs(model, part, rows, g, prompt_features=prompts,
                                                    **kw)
            assert new.requires_grad == grad
            mask = part["completion_mask"].bool()
            for got in (new, with_feats):
                diff = float((got - old).detach().abs()[mask].max())
                assert diff <= TOL, f"{name}, rows {rows}: log-probs differ by {diff:.2e}"


@pytest.mark.parametrize("micro_batch", [3, 8])
def test_one_update_equals_the_per_row_update(compose_cfg, tiny_model_dir, phantom_dataset,
                                              tmp_path, micro_batch):
    common = [f"model.micro_batch_size={micro_batch}", "grpo.mu=2", "optim.lr=1e-4"]
    shared = _trainer(compose_cfg, tiny_model_dir, tmp_path / "a", common)
    per_row = _trainer(compose_cfg, tiny_model_dir, tmp_path / "b",
                       [*common, "grpo.shared_prefix_update=false"])
    assert shared.cfg.grpo.shared_prefix_update and not per_row.cfg.grpo.shared_prefix_update
    ro = update_probe.first_rollout(shared)
    new_update = update_probe.one_update(shared, ro, ADV)
    old_update = update_probe.one_update(per_row, ro, ADV)
    g_new, new, start = new_update.grads, new_update.after, new_update.start
    g_old, old = old_update.grads, old_update.after
    assert len(g_new) == len(g_old) == 2  # mu = 2 optimizer steps
    # Step 0 starts from the same weights: the gradients differ by float32 rounding only
    # (measured 1.9e-6 of a tensor's norm at most, a key bias; the float64 test below shows the
    # arithmetic is the same). Step 1 starts from weights that differ by that rounding after
    # AdamW's first step (measured 6.2e-6).
    for step, (a, b) in enumerate(zip(g_new, g_old)):
        assert set(a) == set(b) and b
        worst = max((float((a[n] - b[n]).norm() / b[n].norm()), n) for n in b)
        assert worst[0] <= GRAD_TOL[step], f"step {step}: {worst[1]} gradient differs by {worst[0]:.2e}"
    # AdamW's first steps move each weight by about lr whatever its gradient's size (m / sqrt(v)),
    # so the rounding of near-zero gradient elements shows in the weights at the scale of lr:
    # measured 1.5e-6 and 2.7e-6 at optim.lr = 1e-4 (the embedded preset's), i.e. 1.5-2.7% of
    # one step; within 1e-6 only for lr <= ~3e-5 (the paper's 1e-6 included).
    lr = shared.cfg.optim.lr
    moved = [n for n in old if not torch.equal(old[n], start[n])]
    assert moved
    worst = max((float((new[n] - old[n]).abs().max()), n) for n in old)
    assert worst[0] <= 0.05 * lr, f"{worst[1]}: parameters differ by {worst[0]:.2e} (lr {lr})"


def test_float64_same_arithmetic(compose_cfg, tiny_model_dir, phantom_dataset, tmp_path):
    """Float64 (the HF model directly, train mode): the log-probs agree within 1e-12 and the
    gradient of a weighted sum of them within F64_GRAD_TOL of each tensor's norm, whole groups and
    a split group, prompts of different lengths."""
    trainer = _trainer(compose_cfg, tiny_model_dir, tmp_path)
    ro = update_probe.first_rollout(trainer)
    g = trainer.cfg.grpo.num_generations
    kw = {"temperature": trainer.cfg.grpo.temperature, "suppress_token_ids": trainer.suppress}
    model = load_model(tiny_model_dir, dtype="float32", attn_implementation="sdpa").double().train()
    batch = _shorter_prompts(ro.batch, range(4), 3, trainer.processor.tokenizer.pad_token_id)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}

    def run(rows: range, shared: bool):
        part = slice_batch(batch, rows.start, rows.stop)
        weights = torch.randn(part["completion_mask"].shape, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(0))  # [n, L]
        model.zero_grad()
        if shared:
            logp = shared_prefix_logprobs(model, part, rows, g, **kw)  # [n, L]
        else:
            logp = completion_logprobs(model, part, **kw)  # [n, L]
        (logp * weights * part["completion_mask"]).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for rows in (range(8), range(3, 6)):
        (logp_new, grad_new), (logp_old, grad_old) = run(rows, True), run(rows, False)
        mask = slice_batch(batch, rows.start, rows.stop)["completion_mask"].bool()
        assert float((logp_new - logp_old).abs()[mask].max()) <= 1e-12
        worst = max((float((grad_new[n] - grad_old[n]).norm() / grad_old[n].norm()), n)
                    for n in grad_old if grad_old[n].norm() > 0)
        assert worst[0] <= F64_GRAD_TOL, f"rows {rows}: {worst[1]} gradient differs by {worst[0]:.2e}"


def test_switch_off_runs_the_per_row_forward_only(compose_cfg, tiny_model_dir, phantom_dataset,
                                                  tmp_path, monkeypatch):
    trainer = _trainer(compose_cfg, tiny_model_dir, tmp_path,
                       ["grpo.shared_prefix_update=false", "grpo.mu=2"])
    ro = update_probe.first_rollout(trainer)

    def refuse(*_a, **_k):
        raise AssertionError("shared_prefix_logprobs called with grpo.shared_prefix_update=false")

    calls = []
    real = completion_logprobs

    def count(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr("medloc.grpo.trainer.shared_prefix_logprobs", refuse)
    monkeypatch.setattr("medloc.grpo.trainer.completion_logprobs", count)
    trainer.update(ro.batch, ADV, dead=0.0, image_features=ro.image_features)
    # micro-batches of the cpu_tiny preset; reference + old policy + 2 policy passes each
    mb = trainer.cfg.model.micro_batch_size
    assert len(calls) == 4 * -(-8 // mb)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_checkpointing_is_active_in_both_forwards(compose_cfg, tiny_model_dir, phantom_dataset,
                                                  tmp_path, checkpointing):
    """A pre-hook on every decoder layer's MLP (tests/integration/test_train_mode.py): 2 forwards
    (prefix, completions), each entered again in the backward when checkpointed; the gradient is
    the same either way."""
    trainer = _trainer(compose_cfg, tiny_model_dir, tmp_path)
    ro = update_probe.first_rollout(trainer)
    g = trainer.cfg.grpo.num_generations
    module = load_model(tiny_model_dir, dtype="float32", attn_implementation="sdpa")
    if checkpointing:  # as medloc/engine.py turns it on
        enable_checkpointing(module)
    module.train()
    layers = module.model.language_model.layers
    calls = [0] * len(layers)
    handles = [layer.mlp.register_forward_pre_hook(
        lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
    try:
        logp = shared_prefix_logprobs(module, ro.batch, range(8), g,
                                      temperature=trainer.cfg.grpo.temperature,
                                      suppress_token_ids=trainer.suppress)
        (logp * ro.batch["completion_mask"]).sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert calls == [2 * (2 if checkpointing else 1)] * len(layers), calls
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    with lp._cache_under_checkpointing(module):
        pass  # the switch is put back: no layer keeps the cache under checkpointing afterwards
    assert all("_can_checkpoint_with_cache" not in m.__dict__ for m in module.modules())
    # the reference gradient: per-row forward, checkpointing as configured
    logp = completion_logprobs(module, ro.batch,
                               temperature=trainer.cfg.grpo.temperature,
                               suppress_token_ids=trainer.suppress)
    (logp * ro.batch["completion_mask"]).sum().backward()
    assert grads and set(grads) == {n for n, p in module.named_parameters() if p.grad is not None}
    for n, p in module.named_parameters():
        if p.grad is None:
            continue
        rel = float((grads[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
        assert rel <= TOL, f"{n}: gradient differs by {rel:.2e} of its norm"
    module.zero_grad(set_to_none=True)
