"""The reward-sparsity probe's arithmetic (experiments/sparsity.py)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.sparsity import group_sparsity


def test_group_sparsity_by_hand() -> None:
    # 3 groups of G=4 sampled IoUs
    ious = np.array([[0.0, 0.1, 0.2, 0.35],   # best 0.35: a hit at 0.3, all-zero at 0.5
                     [0.0, 0.0, 0.0, 0.0],    # all-zero at every τ > 0
                     [0.6, 0.5, 0.2, 0.1]])   # hits at 0.3 (2) and at 0.5 (2, 0.5 >= 0.5)
    out = group_sparsity(ious, [0.3, 0.5])
    assert out["0.30"]["all_zero_frac"] == pytest.approx(1 / 3)  # only group 2
    assert out["0.30"]["hit_rate"] == pytest.approx(3 / 12)  # 0.35, 0.6, 0.5
    assert out["0.50"]["all_zero_frac"] == pytest.approx(2 / 3)  # groups 1 and 2
    assert out["0.50"]["hit_rate"] == pytest.approx(2 / 12)
