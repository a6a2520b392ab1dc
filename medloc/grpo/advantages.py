"""Group-normalised GRPO advantages and the reward-sparsity statistics (docs/method.md §2).

For each prompt the trainer samples G completions and scores them; the G rewards of one prompt form
a *group*. GRPO replaces a learned value baseline by the group's own statistics:

    A_i = (r_i - mean(r)) / (std(r) + eps)                                  (docs/method.md §2)

A group whose G rewards are all equal carries no learning signal: its advantages are 0, so its
policy gradient vanishes. With binary IoU-threshold rewards this happens whenever every sample of a
prompt misses (all 0) or every sample hits (all 1). MedLoc-R1's curriculum exists to keep that
"dead group" fraction low, so it is computed and logged here every step.

Shapes: B prompts, G samples per prompt. Rewards arrive flat as ``[B*G]`` with the G samples of one
prompt in one contiguous block (prompt 0's samples first, then prompt 1's, ...).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

AdvantageScale = Literal["std", "none"]
"""``"std"``: divide by (std + eps) as GRPO does (docs/method.md §2). ``"none"``: only subtract the group
mean (Dr. GRPO's unscaled advantage)."""

StdEstimator = Literal["unbiased", "population"]
"""Which standard deviation scales the advantage. ``"unbiased"`` (divide by G-1) is what
``torch.std`` does by default and what TRL and VLM-R1 use, so it is our default; ``"population"``
divides by G."""


def group_advantages(
    rewards: Tensor,
    group_size: int,
    eps: float = 1e-4,
    scale: AdvantageScale = "std",
    std_estimator: StdEstimator = "unbiased",
) -> tuple[Tensor, dict[str, float]]:
    """Group-normalised advantages ``A = (r - mean) / (std + eps)`` (docs/method.md §2).

    Args:
        rewards: ``[B*G]`` rewards, groups of ``group_size`` contiguous entries.
        group_size: G, the number of completions sampled per prompt (>= 2).
        eps: added to the group std before dividing (VLM-R1/TRL use 1e-4).
        scale: ``"std"`` (GRPO) or ``"none"`` (mean-centred only, Dr. GRPO).
        std_estimator: ``"unbiased"`` (G-1, torch/TRL default) or ``"population"`` (G).

    Returns:
        ``(advantages [B*G], metrics)``. A group whose rewards are all exactly equal gets advantage
        exactly 0.0 (not merely close to 0: ``mean`` of G equal floats can differ from them in the
        last bit, so those groups are zeroed explicitly). Metrics, as Python floats:

        - ``reward/mean``: mean of all B*G rewards;
        - ``reward/std``: mean over groups of the within-group std (same estimator as the
          advantage), i.e. the spread that actually drives the advantages;
        - ``reward/dead_group_frac``: fraction of groups whose rewards are all equal (zero
          variance, zero policy gradient);
        - ``reward/all_zero_frac``: fraction of groups where every reward == 0 (all misses);
        - ``reward/all_one_frac``: fraction of groups where every reward == 1 (all hits; for
          continuous rewards such as raw IoU this means every reward is exactly 1.0).

        ``all_zero`` and ``all_one`` groups are both dead; a dead group with another common
        value (e.g. every raw-IoU reward 0.4) counts in ``dead_group_frac`` only.
    """
    if scale not in get_args(AdvantageScale):
        raise ValueError(f"scale={scale!r}; expected one of {get_args(AdvantageScale)}")
    if std_estimator not in get_args(StdEstimator):
        raise ValueError(
            f"std_estimator={std_estimator!r}; expected one of {get_args(StdEstimator)}"
        )
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B*G]; got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}; GRPO needs at least 2 samples per prompt")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a positive multiple of "
            f"group_size={group_size}"
        )
    if eps < 0:
        raise ValueError(f"eps={eps}; expected >= 0")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")

    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))  # [B*G]
    grouped = r.view(-1, group_size)  # [B, G]
    mean = grouped.mean(dim=1, keepdim=True)  # [B, 1]
    std = grouped.std(dim=1, keepdim=True, unbiased=(std_estimator == "unbiased"))  # [B, 1]
    # Dead = every reward in the group identical. Compare max and min rather than testing std == 0,
    # which is an exact statement about the rewards rather than about rounding in std.
    dead = grouped.amax(dim=1) == grouped.amin(dim=1)  # [B]

    centred = grouped - mean  # [B, G]
    if scale == "std":
        adv = centred / (std + eps)  # [B, G]
    elif scale == "none":
        adv = centred
    else:  # unreachable: validated above
        raise AssertionError(scale)
    adv = torch.where(dead[:, None], torch.zeros_like(adv), adv)  # [B, G]; dead groups exactly 0

    metrics = {
        "reward/mean": r.mean().item(),
        "reward/std": std.mean().item(),
        "reward/dead_group_frac": dead.float().mean().item(),
        "reward/all_zero_frac": (grouped == 0).all(dim=1).float().mean().item(),
        "reward/all_one_frac": (grouped == 1).all(dim=1).float().mean().item(),
    }
    return adv.reshape(-1), metrics  # [B*G], float32 (or float64 for float64 rewards)
