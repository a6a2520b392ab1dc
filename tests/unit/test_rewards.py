"""medloc.rewards: binary-at-τ (both operators), raw IoU, V-Triune gated IoU, format reward,
the weighted combination with its logged components, and the accuracy-reward dispatcher.
"""

from __future__ import annotations

import numpy as np
import pytest

from medloc.parsing import parse_completion
from medloc.rewards import (
    accuracy_reward,
    binary_reward,
    combine_rewards,
    format_reward,
    gated_iou_reward,
    raw_iou_reward,
)

IOUS = np.array([0.0, 0.3, 0.49, 0.5, 0.51, 0.9, float("nan")])


def test_binary_reward_operators():
    # ">=": 0.5 counts as a hit at τ = 0.5 (the paper); ">" (early VLM-R1): it does not.
    assert binary_reward(IOUS, 0.5, ">=").tolist() == [0, 0, 0, 1, 1, 1, 0]  # NaN -> miss
    assert binary_reward(IOUS, 0.5, ">").tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert binary_reward(IOUS, 0.5).tolist() == binary_reward(IOUS, 0.5, ">=").tolist()
    assert binary_reward(IOUS, 0.5).dtype == np.float64
    with pytest.raises(ValueError, match="'=>'"):
        binary_reward(IOUS, 0.5, "=>")


def test_raw_iou_reward():
    assert raw_iou_reward(IOUS).tolist() == [0.0, 0.3, 0.49, 0.5, 0.51, 0.9, 0.0]


def test_gated_iou_reward():
    # IoU · 1[IoU >= 0.5]: 0.5 -> 0.5, 0.51 -> 0.51, 0.9 -> 0.9, everything below -> 0
    assert gated_iou_reward(IOUS, 0.5).tolist() == [0.0, 0.0, 0.0, 0.5, 0.51, 0.9, 0.0]
    # with ">" the IoU exactly at ε is gated out
    assert gated_iou_reward(IOUS, 0.5, ">").tolist() == [0.0, 0.0, 0.0, 0.0, 0.51, 0.9, 0.0]


def test_format_reward():
    parsed = [
        parse_completion('<think>a</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>'),
        parse_completion("<answer>[1, 2, 3, 4]</answer>"),  # box ok, paper format not ok
        parse_completion("no answer"),
    ]
    assert format_reward(parsed).tolist() == [1.0, 0.0, 0.0]
    assert format_reward([]).shape == (0,)


def test_accuracy_reward_dispatch():
    ious = [0.2, 0.6]
    assert accuracy_reward(ious, "binary", 0.5, ">=").tolist() == [0.0, 1.0]
    assert accuracy_reward(ious, "raw_iou", None).tolist() == [0.2, 0.6]
    assert accuracy_reward(ious, "gated_iou", 0.5, ">=").tolist() == [0.0, 0.6]
    with pytest.raises(ValueError, match="needs a threshold"):
        accuracy_reward(ious, "binary", None)
    with pytest.raises(ValueError, match="needs a threshold"):
        accuracy_reward(ious, "gated_iou", None)
    with pytest.raises(ValueError, match="takes no threshold"):
        accuracy_reward(ious, "raw_iou", 0.5)
    with pytest.raises(ValueError, match="'dense'.*binary"):
        accuracy_reward(ious, "dense", 0.5)


def test_combine_rewards_weighted_sum_and_metrics():
    acc = np.array([1.0, 0.0, 1.0, 0.0])
    fmt = np.array([1.0, 1.0, 0.0, 0.0])
    total, metrics = combine_rewards({"accuracy": acc, "format": fmt}, {"accuracy": 1.0, "format": 0.5})
    # total = acc + 0.5 fmt = [1.5, 0.5, 1.0, 0.0]
    assert total.tolist() == [1.5, 0.5, 1.0, 0.0]
    # means: accuracy 2/4 = 0.5, format 2/4 = 0.5, total 3/4 = 0.75;
    # std (population) of total: deviations .75 -.25 .25 -.75 -> squares sum 1.25 -> /4 -> sqrt .3125
    assert metrics == pytest.approx({
        "reward/accuracy": 0.5, "reward/format": 0.5, "reward/mean": 0.75,
        "reward/std": 0.3125 ** 0.5,
    })


def test_combine_rewards_rejects_mismatches():
    a = np.zeros(3)
    with pytest.raises(ValueError, match="missing weights: \\['format'\\]"):
        combine_rewards({"accuracy": a, "format": a}, {"accuracy": 1.0})
    with pytest.raises(ValueError, match="weights without component: \\['format'\\]"):
        combine_rewards({"accuracy": a}, {"accuracy": 1.0, "format": 1.0})
    with pytest.raises(ValueError, match="equal lengths"):
        combine_rewards({"accuracy": a, "format": np.zeros(2)}, {"accuracy": 1.0, "format": 1.0})
