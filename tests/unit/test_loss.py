"""The GRPO loss (medloc.grpo.loss, docs/method.md §2).

Hand-worked clipped-surrogate values and gradients (ratio inside/outside the clip range, positive
and negative advantages), the k3 KL, the beta switch, dead groups, masking, the three aggregations,
and the exact invariance of the summed loss and gradients under micro-batching.
"""

from __future__ import annotations

import math

import pytest
import torch

from medloc.grpo import loss as loss_module
from medloc.grpo.advantages import group_advantages
from medloc.grpo.loss import grpo_loss, kl_k3, sampled_token_logprobs, selective_log_softmax

torch.set_num_threads(1)
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# selective_log_softmax


def test_selective_log_softmax_hand_worked():
    # Row logits [0, ln 3] -> probs [1/4, 3/4]; row logits [0, 0] -> probs [1/2, 1/2].
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # [1, 2, 2]
    ids = torch.tensor([[1, 0]])
    out = selective_log_softmax(logits, ids)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.5)]]))


def test_selective_log_softmax_matches_full_log_softmax_and_grad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    ours = selective_log_softmax(logits, ids)
    ref = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (g1,) = torch.autograd.grad(ours.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_selective_log_softmax_bf16_input_computes_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    out = selective_log_softmax(logits, ids)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_selective_log_softmax_shape_error():
    with pytest.raises(ValueError, match=r"ids \[N, L\]"):
        selective_log_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# sampled_token_logprobs


def test_sampled_token_logprobs_hand_worked():
    # Logits [0, ln 3, 5] at T=1 with token 2 banned -> probs [1/4, 3/4, 0]; at T=0.5 the
    # logits double: [0, 2 ln 3] -> probs [1/10, 9/10].
    logits = torch.tensor([[[0.0, math.log(3.0), 5.0], [0.0, math.log(3.0), 5.0]]])  # [1, 2, 3]
    ids = torch.tensor([[1, 0]])
    banned = torch.tensor([False, False, True])
    out = sampled_token_logprobs(logits, ids, temperature=1.0, banned=banned)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    out = sampled_token_logprobs(logits, ids, temperature=0.5, banned=banned)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.9), math.log(0.1)]]))


@pytest.mark.parametrize("chunk_elements", [1, 2 * 5 * 11, 10**9])  # 1 row, 2 rows, all rows
def test_sampled_token_logprobs_is_the_same_in_any_chunks(monkeypatch, chunk_elements):
    """Rows are taken in chunks (LOGPROB_CHUNK_ELEMENTS): the values and gradients are those of
    one full log-softmax, and bit for bit the same whatever the chunk size."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 4, 11, generator=g, requires_grad=True)
    ids = torch.randint(0, 10, (5, 4), generator=g)
    banned = torch.zeros(11, dtype=torch.bool)
    banned[10] = True
    weights = torch.randn(5, 4, generator=g)

    def run():
        out = sampled_token_logprobs(logits, ids, temperature=0.7, banned=banned)
        (grad,) = torch.autograd.grad((out * weights).sum(), logits)
        return out.detach(), grad

    one_chunk = run()
    monkeypatch.setattr(loss_module, "LOGPROB_CHUNK_ELEMENTS", chunk_elements)
    chunked = run()
    assert torch.equal(chunked[0], one_chunk[0]) and torch.equal(chunked[1], one_chunk[1])
    scaled = (logits / 0.7).masked_fill(banned, float("-inf"))
    ref = torch.log_softmax(scaled, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chunked[0], ref.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# k3 KL


def test_kl_k3_exactly_zero_when_equal():
    logp = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros(4, 6))


def test_kl_k3_hand_worked_and_positive():
    # d = ref - logp.  d = 1: e - 1 - 1 = 0.7182818;  d = -1: e^-1 + 1 - 1 = 0.3678794;
    # d = 2: e^2 - 3 = 4.3890561.  Small |d|: d^2/2 + d^3/6 + ... > 0, so d = +-1e-3 gives
    # 5e-7 +- 1.6667e-10 = 5.0016667e-7 and 4.9983333e-7.
    logp = torch.zeros(1, 5, dtype=F64)
    ref = torch.tensor([[1.0, -1.0, 2.0, 1e-3, -1e-3]], dtype=F64)
    kl = kl_k3(logp, ref)
    expected = torch.tensor(
        [[math.e - 2, math.exp(-1.0), math.e**2 - 3, 5.0016667e-7, 4.9983333e-7]], dtype=F64
    )
    torch.testing.assert_close(kl, expected, rtol=1e-6, atol=0)
    small = kl_k3(torch.zeros(4), torch.tensor([1e-6, -1e-6, 1e-3, -0.5]))  # float32
    assert (small > 0).all()


# ---------------------------------------------------------------------------------------------
# Clipped surrogate, hand-worked.
#
# eps_low = eps_high = 0.2, so the clip range is [0.8, 1.2]. Log-probs are chosen so that the
# ratio rho = exp(logp - old_logp) takes exact values: old_logp = -1, logp = -1 + ln(rho).
#
#   seq 0, A = +1:  rho = 1.5 -> min(1.5 * 1, 1.2 * 1) = 1.2   loss -1.2  clipped (rho > 1.2, A > 0)
#                   rho = 0.5 -> min(0.5 * 1, 0.8 * 1) = 0.5   loss -0.5  not clipped
#   seq 1, A = -1:  rho = 1.5 -> min(-1.5, -1.2)       = -1.5  loss  1.5  not clipped
#                   rho = 0.5 -> min(-0.5, -0.8)       = -0.8  loss  0.8  clipped (rho < 0.8, A < 0)
#
# "grpo": seq means -0.85 and 1.15, loss = (-0.85 + 1.15) / 2 = 0.15.
# Gradient w.r.t. logp of an unclipped token = -A * rho / (L * N); clipped tokens give 0:
#   seq0 tok1: -(+1)(0.5)/4 = -0.125;  seq1 tok0: -(-1)(1.5)/4 = +0.375.


def _hand_example():
    rho = torch.tensor([[1.5, 0.5], [1.5, 0.5]], dtype=F64)
    old = torch.full((2, 2), -1.0, dtype=F64)
    logp = (old + torch.log(rho)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    return logp, old, adv


def test_clipped_surrogate_hand_worked_value_grad_and_metrics():
    logp, old, adv = _hand_example()
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, m = grpo_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0)
    assert loss.item() == pytest.approx(0.15, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.125], [0.375, 0.0]], dtype=F64))
    # Masked token means: policy (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; 2 of 4 tokens clipped;
    # mean ratio (1.5 + 0.5 + 1.5 + 0.5) / 4 = 1.0; no reference -> kl 0.
    assert float(m["loss/policy"]) == pytest.approx(0.15, abs=1e-12)
    assert float(m["loss/clip_frac"]) == 0.5
    assert float(m["policy/ratio_mean"]) == pytest.approx(1.0, abs=1e-12)
    assert float(m["loss/kl"]) == 0.0
    assert float(m["loss/total"]) == pytest.approx(0.15, abs=1e-12)
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())  # 0-d, detached


def test_asymmetric_clip_range():
    # eps_high = 0.6 -> upper bound 1.6: seq0 tok0 rho = 1.5 is now inside -> loss -1.5, grad
    # -(1)(1.5)/4 = -0.375. eps_low = 0.4 -> lower bound 0.6: seq1 tok1 rho = 0.5 is still outside
    # -> min(-0.5, -0.6) = -0.6, loss 0.6, clipped. grpo loss = ((-1.5 - 0.5)/2 + (1.5 + 0.6)/2)/2
    # = (-1.0 + 1.05) / 2 = 0.025.
    logp, old, adv = _hand_example()
    mask = torch.ones(2, 2)
    loss, m = grpo_loss(logp, old, None, adv, mask, eps_low=0.4, eps_high=0.6, beta=0.0)
    assert loss.item() == pytest.approx(0.025, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-0.375, -0.125], [0.375, 0.0]], dtype=F64))
    assert float(m["loss/clip_frac"]) == 0.25


def test_aggregations_hand_worked_with_mask():
    # Mask out seq1 tok1 (put NaN there: it must not leak). Remaining token losses:
    # seq0: -1.2, -0.5; seq1: 1.5.
    #   grpo:    ((-1.2 - 0.5)/2 + 1.5/1) / 2 = (-0.85 + 1.5)/2 = 0.325
    #   bnpo:    (-1.2 - 0.5 + 1.5) / 3 = -0.0666667
    #   dr_grpo: (-1.2 - 0.5 + 1.5) / (2 sequences * 4 max tokens) = -0.025
    logp, old, adv = _hand_example()
    logp = logp.detach().clone()
    logp[1, 1] = float("nan")
    logp.requires_grad_(True)
    mask = torch.tensor([[1, 1], [1, 0]])
    expected = {"grpo": 0.325, "bnpo": -0.2 / 3, "dr_grpo": -0.025}
    for agg, value in expected.items():
        loss, m = grpo_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                            aggregation=agg, max_completion_len=4)
        assert loss.item() == pytest.approx(value, abs=1e-12), agg
        (grad,) = torch.autograd.grad(loss, logp)
        assert grad[1, 1].item() == 0.0 and torch.isfinite(grad).all(), agg
        # metrics are masked means over the 3 real tokens: (-1.2 - 0.5 + 1.5) / 3
        assert float(m["loss/policy"]) == pytest.approx(-0.2 / 3, abs=1e-12)
        assert float(m["loss/clip_frac"]) == pytest.approx(1 / 3, abs=1e-12)


def test_on_policy_ratio_is_one_with_gradient():
    # old_logp=None (mu = 1): rho = 1 in value, d rho / d logp = 1, nothing is clipped.
    # grpo loss = -mean(A) = -(2 - 1)/2 = -0.5; grad per token = -A / (L * N): seq0 -2/4 = -0.5,
    # seq1 +1/4 = 0.25.
    logp = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    logp.requires_grad_(True)
    adv = torch.tensor([2.0, -1.0], dtype=F64)
    loss, m = grpo_loss(logp, None, None, adv, torch.ones(2, 2), eps_low=0.2, eps_high=0.2,
                        beta=0.0)
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5], [0.25, 0.25]], dtype=F64))
    assert float(m["policy/ratio_mean"]) == 1.0 and float(m["loss/clip_frac"]) == 0.0


def test_kl_term_hand_worked_and_beta_zero_removes_it():
    # A = 0 everywhere, on-policy: policy term 0. ref - logp = 1 at every token -> KL = e - 2.
    # beta = 0.4, grpo aggregation: loss = 0.4 * (e - 2) = 0.28731273.
    # d KL / d logp = 1 - exp(ref - logp) = 1 - e, so grad = 0.4 * (1 - e) / (L * N) with L = 3,
    # N = 2: 0.4 * (-1.7182818) / 6 = -0.11455212.
    logp = torch.full((2, 3), -2.0, dtype=F64, requires_grad=True)
    ref = torch.full((2, 3), -1.0, dtype=F64)
    adv = torch.zeros(2, dtype=F64)
    mask = torch.ones(2, 3)
    loss, m = grpo_loss(logp, None, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.4)
    assert loss.item() == pytest.approx(0.4 * (math.e - 2), abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.full((2, 3), 0.4 * (1 - math.e) / 6, dtype=F64))
    assert float(m["loss/kl"]) == pytest.approx(math.e - 2, abs=1e-12)
    assert float(m["loss/total"]) == pytest.approx(0.4 * (math.e - 2), abs=1e-12)

    # beta = 0: the KL is still reported but adds nothing to the loss or its gradient.
    loss0, m0 = grpo_loss(logp, None, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0)
    assert loss0.item() == 0.0
    (grad0,) = torch.autograd.grad(loss0, logp)
    assert torch.equal(grad0, torch.zeros_like(grad0))
    assert float(m0["loss/kl"]) == pytest.approx(math.e - 2, abs=1e-12)
    assert float(m0["loss/total"]) == 0.0


def test_kl_metric_zero_when_policy_equals_reference():
    logp = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5])
    _, m = grpo_loss(logp, None, logp.detach().clone(), adv, torch.ones(3, 4), eps_low=0.2,
                     eps_high=0.2, beta=0.4)
    assert float(m["loss/kl"]) == 0.0


def test_all_dead_groups_give_zero_policy_gradient():
    # Two prompts x G=4, every group constant -> A = 0 exactly -> no policy gradient at all,
    # even off-policy with ratios far outside the clip range.
    adv, metrics = group_advantages(torch.tensor([0.0] * 4 + [1.0] * 4), group_size=4)
    assert metrics["reward/dead_group_frac"] == 1.0
    gen = torch.Generator().manual_seed(5)
    logp = torch.randn(8, 6, generator=gen, requires_grad=True)
    old = logp.detach() + torch.randn(8, 6, generator=gen)
    for agg in ("grpo", "bnpo", "dr_grpo"):
        loss, _ = grpo_loss(logp, old, None, adv, torch.ones(8, 6), eps_low=0.2, eps_high=0.2,
                            beta=0.0, aggregation=agg, max_completion_len=6)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.equal(grad, torch.zeros_like(grad)), agg


def test_masked_tokens_contribute_nothing():
    # Changing logp/old/ref at masked positions (even to inf/NaN) changes neither the loss nor the
    # gradient at real tokens, and the gradient at masked tokens is exactly 0.
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(3, 5, generator=gen, dtype=F64)
    old = base + 0.1 * torch.randn(3, 5, generator=gen, dtype=F64)
    ref = base + 0.1 * torch.randn(3, 5, generator=gen, dtype=F64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)

    def run(lp, od, rf):
        lp = lp.clone().requires_grad_(True)
        loss, _ = grpo_loss(lp, od, rf, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.4)
        (grad,) = torch.autograd.grad(loss, lp)
        return loss, grad

    loss_a, grad_a = run(base, old, ref)
    junk = torch.where(mask, 0.0, float("nan")).to(F64)
    loss_b, grad_b = run(base + junk, old + torch.where(mask, 0.0, float("inf")), ref + junk)
    assert loss_a.item() == loss_b.item()
    assert torch.equal(grad_a, grad_b)
    assert torch.equal(grad_a[~mask], torch.zeros(int((~mask).sum()), dtype=F64))


# ---------------------------------------------------------------------------------------------
# Micro-batch / multi-process invariance: with the global normaliser passed in, the micro-batch
# losses (and gradients) sum to the full-batch loss (and gradient).


def _random_batch(dtype):
    gen = torch.Generator().manual_seed(7)
    n, length = 8, 6
    logp = -torch.rand(n, length, generator=gen, dtype=dtype) * 3
    old = logp + 0.3 * torch.randn(n, length, generator=gen, dtype=dtype)
    ref = logp + 0.3 * torch.randn(n, length, generator=gen, dtype=dtype)
    adv, _ = group_advantages(torch.rand(n, generator=gen, dtype=dtype), group_size=4)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 3])
    mask = torch.arange(length)[None, :] < lengths[:, None]  # [N, L]
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("split", [[8], [3, 3, 2], [1] * 8, [5, 3]])
def test_micro_batch_sum_equals_full_batch(aggregation, split, dtype, tol):
    logp, old, ref, adv, mask = _random_batch(dtype)
    kwargs = {
        "eps_low": 0.2, "eps_high": 0.28, "beta": 0.4, "aggregation": aggregation,
        "global_tokens": float(mask.sum()), "global_sequences": 8.0, "max_completion_len": 10,
    }

    full_lp = logp.clone().requires_grad_(True)
    full_loss, _ = grpo_loss(full_lp, old, ref, adv, mask, **kwargs)
    (full_grad,) = torch.autograd.grad(full_loss, full_lp)

    # Each chunk may be a micro-batch on one rank or a different rank: either way only the global
    # normaliser ties them together.
    micro_lp = logp.clone().requires_grad_(True)
    total = torch.zeros((), dtype=dtype)
    start = 0
    for size in split:
        sl = slice(start, start + size)
        part, _ = grpo_loss(micro_lp[sl], old[sl], ref[sl], adv[sl], mask[sl], **kwargs)
        total = total + part
        start += size
    (micro_grad,) = torch.autograd.grad(total, micro_lp)
    assert abs(total.item() - full_loss.item()) <= tol
    torch.testing.assert_close(micro_grad, full_grad, rtol=0, atol=tol)


def test_local_token_normaliser_is_not_invariant():
    # The reason for the global normaliser: normalising each micro-batch by its own token count
    # and averaging the micro-batches weighs tokens of short micro-batches more. Guards the
    # invariance test above against being vacuous.
    logp, old, ref, adv, mask = _random_batch(torch.float64)
    kw = {"eps_low": 0.2, "eps_high": 0.2, "beta": 0.4, "aggregation": "bnpo"}
    full, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    parts = [grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], **kw)[0]
             for s in (slice(0, 2), slice(2, 8))]
    assert abs((parts[0] + parts[1]).item() / 2 - full.item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Validation


def test_invalid_arguments():
    logp = torch.zeros(2, 3)
    adv = torch.zeros(2)
    mask = torch.ones(2, 3)
    kw = {"eps_low": 0.2, "eps_high": 0.2, "beta": 0.0}
    with pytest.raises(ValueError, match="aggregation='dapo'"):
        grpo_loss(logp, None, None, adv, mask, aggregation="dapo", **kw)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, None, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.4)
    with pytest.raises(ValueError, match="max_completion_len >= L=3"):
        grpo_loss(logp, None, None, adv, mask, aggregation="dr_grpo", max_completion_len=2, **kw)
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logp, None, None, torch.zeros(3), mask, **kw)
    with pytest.raises(ValueError, match="mask has shape"):
        grpo_loss(logp, None, None, adv, torch.ones(2, 4), **kw)
    with pytest.raises(ValueError, match="global_tokens=0.0"):
        grpo_loss(logp, None, None, adv, mask, aggregation="bnpo", global_tokens=0.0, **kw)
    with pytest.raises(ValueError, match="eps_low=1.0"):
        grpo_loss(logp, None, None, adv, mask, eps_low=1.0, eps_high=0.2, beta=0.0)
