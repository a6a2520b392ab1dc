"""Group-normalised GRPO advantages and reward-sparsity metrics (medloc.grpo.advantages, docs/method.md §2).

Hand-worked numbers for both std estimators, the exact-zero guarantee for dead groups, the
dead / all-zero / all-one fractions, and input validation.
"""

from __future__ import annotations

import math

import pytest
import torch

from medloc.grpo.advantages import group_advantages

torch.set_num_threads(1)


def test_hand_worked_unbiased_std():
    # Group [1, 0, 0, 0]: mean = 0.25.
    # Unbiased variance = (0.75^2 + 3 * 0.25^2) / (4 - 1) = (0.5625 + 0.1875) / 3 = 0.25 -> std 0.5.
    # A = (r - 0.25) / (0.5 + 0) -> [1.5, -0.5, -0.5, -0.5].
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv, _ = group_advantages(r, group_size=4, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64))


def test_hand_worked_population_std():
    # Same group; population variance = 0.75 / 4 = 0.1875 -> std = sqrt(3)/4 = 0.4330127.
    # A = 0.75 / (sqrt(3)/4) = sqrt(3) for the hit, -0.25 / (sqrt(3)/4) = -1/sqrt(3) for misses.
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv, _ = group_advantages(r, group_size=4, eps=0.0, std_estimator="population")
    s3 = math.sqrt(3.0)
    expected = torch.tensor([s3, -1 / s3, -1 / s3, -1 / s3], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)


def test_eps_is_added_to_std():
    # A_hit = 0.75 / (0.5 + 1e-4) = 1.49970006 (not 1.5).
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv, _ = group_advantages(r, group_size=4, eps=1e-4)
    assert adv[0].item() == pytest.approx(0.75 / 0.5001, rel=1e-12)


def test_scale_none_only_centres():
    # Dr. GRPO: A = r - mean = [0.75, -0.25, -0.25, -0.25]; second group [0.2, 0.6]: mean 0.4.
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.2, 0.6, 0.4, 0.4], dtype=torch.float64)
    adv, _ = group_advantages(r, group_size=4, scale="none")
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, -0.2, 0.2, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)


def test_groups_are_contiguous_blocks():
    # Two groups of G=2: [1, 0] and [0, 1]. Unbiased std of {1, 0} = sqrt(0.5) = 0.70710678;
    # A = +-0.5 / 0.70710678 = +-0.70710678. Interleaving (r[0], r[2]) would make both groups dead.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv, metrics = group_advantages(r, group_size=2, eps=0.0)
    h = math.sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([h, -h, -h, h]))
    assert metrics["reward/dead_group_frac"] == 0.0


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, 0.3333333, 123.456])
@pytest.mark.parametrize("group_size", [3, 7, 8])
def test_dead_group_is_exactly_zero(value, group_size):
    r = torch.full((2 * group_size,), value)
    adv, metrics = group_advantages(r, group_size=group_size, eps=1e-4)
    assert torch.equal(adv, torch.zeros_like(adv))  # exact, no NaN
    assert metrics["reward/dead_group_frac"] == 1.0


def test_dead_group_exact_zero_even_with_eps_zero():
    # eps = 0 and std = 0 would be 0/0 = NaN without the explicit zeroing.
    r = torch.tensor([0.5, 0.5, 1.0, 0.0])
    adv, _ = group_advantages(r, group_size=2, eps=0.0)
    assert torch.equal(adv[:2], torch.zeros(2))
    assert not torch.isnan(adv).any()


def test_sparsity_metrics_hand_worked():
    # Four groups of G=4:
    #   [1, 0, 0, 0]    live; unbiased std 0.5
    #   [0, 0, 0, 0]    dead, all-zero
    #   [1, 1, 1, 1]    dead, all-one
    #   [0.4]*4         dead (constant raw-IoU reward), neither all-zero nor all-one
    # reward/mean = (1 + 0 + 4 + 1.6) / 16 = 0.4125; reward/std = mean(0.5, 0, 0, 0) = 0.125.
    r = torch.tensor([1.0, 0, 0, 0] + [0.0] * 4 + [1.0] * 4 + [0.4] * 4, dtype=torch.float64)
    adv, m = group_advantages(r, group_size=4)
    assert m["reward/mean"] == pytest.approx(0.4125, abs=1e-12)
    assert m["reward/std"] == pytest.approx(0.125, abs=1e-12)
    assert m["reward/dead_group_frac"] == 0.75
    assert m["reward/all_zero_frac"] == 0.25
    assert m["reward/all_one_frac"] == 0.25
    assert torch.equal(adv[4:], torch.zeros(12, dtype=torch.float64))
    assert all(isinstance(v, float) for v in m.values())


def test_advantages_sum_to_zero_per_live_group():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(6 * 8, generator=g, dtype=torch.float64)
    adv, _ = group_advantages(r, group_size=8)
    torch.testing.assert_close(adv.view(6, 8).sum(dim=1), torch.zeros(6, dtype=torch.float64))


def test_rewards_are_not_differentiated_through():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], requires_grad=True)
    adv, _ = group_advantages(r, group_size=2)
    assert not adv.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 3}, "multiple of group_size=3"),
        ({"group_size": 1}, "at least 2"),
        ({"group_size": 2, "scale": "rank"}, "scale='rank'"),
        ({"group_size": 2, "std_estimator": "mad"}, "std_estimator='mad'"),
        ({"group_size": 2, "eps": -1.0}, "eps=-1.0"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(4), **kwargs)


def test_invalid_rewards():
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([0.0, float("nan")]), group_size=2)
