"""medloc.boxes: IoU (scalar / row-wise / all-pairs), area, clipping, degenerate boxes, the
Qwen2.5-VL model-input size rule and the original <-> model-input frame mapping.

Hand-worked expectations with the arithmetic in comments, plus hypothesis properties (IoU in
[0, 1], symmetric, equal to an independent plain-Python reference; rescale round-trips).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medloc.boxes import (
    area,
    as_box_array,
    clip_box,
    iou,
    iou_matrix,
    is_valid_box,
    model_input_hw,
    pairwise_iou,
    rescale_box,
    to_model_frame,
    to_original_frame,
)

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------- IoU, hand-worked
def test_iou_partial_overlap():
    # [0,0,10,10] ∩ [5,5,15,15] = [5,5,10,10]: 5*5 = 25; union = 100 + 100 - 25 = 175
    assert iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175, abs=1e-15)


def test_iou_contained_box():
    # inner [2,2,4,4] has area 4, outer 100: IoU = 4 / 100
    assert iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(0.04, abs=1e-15)


def test_iou_identical_disjoint_and_touching():
    assert iou([1.5, 2.5, 7.25, 9.0], [1.5, 2.5, 7.25, 9.0]) == 1.0
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    # sharing the edge x = 10 only: intersection width 0 -> IoU 0 (continuous convention)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0


def test_iou_float_coordinates():
    # [0,0,2.5,2] ∩ [0.5,0,3,2] = [0.5,0,2.5,2]: 2*2 = 4; union = 5 + 5 - 4 = 6
    assert iou([0, 0, 2.5, 2], [0.5, 0, 3, 2]) == pytest.approx(4 / 6, abs=1e-15)


@pytest.mark.parametrize(
    "bad",
    [
        [5, 0, 3, 10],  # x2 < x1
        [0, 5, 10, 3],  # y2 < y1
        [0, 0, 0, 10],  # zero width
        [0, 0, 10, 0],  # zero height
        [NAN, 0, 10, 10],
        [0, 0, INF, 10],
        [-INF, 0, 10, 10],
    ],
)
def test_degenerate_boxes_give_zero_never_raise(bad):
    good = [0, 0, 10, 10]
    assert iou(bad, good) == 0.0
    assert iou(good, bad) == 0.0
    assert area(bad) == 0.0
    assert not is_valid_box(bad)
    assert pairwise_iou([bad], [good]).tolist() == [0.0]


def test_iou_huge_finite_boxes_do_not_produce_nan():
    # areas overflow to inf; the pair is treated as a miss rather than NaN
    big = [-1e308, -1e308, 1e308, 1e308]
    v = iou(big, big)
    assert 0.0 <= v <= 1.0


def test_area_continuous_convention():
    # (4 - 1) * (7 - 2) = 3 * 5 = 15 (no +1)
    assert area([1, 2, 4, 7]) == 15.0


def test_wrong_arity_raises_clear_error():
    with pytest.raises(ValueError, match="4 numbers"):
        iou([0, 0, 1], [0, 0, 1, 1])


# ----------------------------------------------------------------------------- vectorised
def test_pairwise_iou_rows_and_none():
    a = [[0, 0, 10, 10], None, [0, 0, 2.5, 2]]
    b = [[5, 5, 15, 15], [0, 0, 1, 1], [0.5, 0, 3, 2]]
    out = pairwise_iou(a, b)
    assert out.shape == (3,)
    # rows: 25/175 (see above), None -> 0, 4/6
    np.testing.assert_allclose(out, [25 / 175, 0.0, 4 / 6], rtol=0, atol=1e-15)


def test_pairwise_iou_shape_mismatch():
    with pytest.raises(ValueError, match="equal shapes"):
        pairwise_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_iou_matrix_all_pairs():
    a = [[0, 0, 10, 10], [0, 0, 2, 2]]
    b = [[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]]
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    # row 0: 25/175, 1, 0.  row 1: [0,0,2,2] vs [5,5,15,15] disjoint -> 0; vs [0,0,10,10]: 4/100; 0
    np.testing.assert_allclose(m, [[25 / 175, 1.0, 0.0], [0.0, 0.04, 0.0]], rtol=0, atol=1e-15)


def test_as_box_array_empty_and_bad_shape():
    assert as_box_array([]).shape == (0, 4)
    assert pairwise_iou(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        as_box_array(np.zeros((3, 5)))


# ----------------------------------------------------------------------------- clip
def test_clip_box():
    # x clamped to [0, 600], y to [0, 450]
    assert clip_box([-5, 3, 700, 500], height=450, width=600) == [0.0, 3.0, 600.0, 450.0]
    assert clip_box([10, 20, 30, 40], height=450, width=600) == [10.0, 20.0, 30.0, 40.0]
    with pytest.raises(ValueError, match="positive"):
        clip_box([0, 0, 1, 1], height=0, width=10)


# ----------------------------------------------------------------------------- model-input frame
def test_model_input_hw_ham10000_size():
    # 450x600 with factor 28: round(450/28) = round(16.07) = 16 -> 448; round(600/28) = round(21.43)
    # = 21 -> 588; 448 * 588 = 263,424 pixels lies inside [3136, 12,845,056] -> no clamp
    assert model_input_hw(450, 600, factor=28, min_pixels=3136, max_pixels=12845056) == (448, 588)


def test_model_input_hw_max_pixels_clamp():
    # 2000x3000, max_pixels = 1280*28*28 = 1,003,520. Rounded 1988x2996 = 5.96M > max, so
    # beta = sqrt(6,000,000 / 1,003,520) = 2.44519; h = floor(2000/2.44519/28) * 28 = floor(29.21)*28
    # = 812; w = floor(3000/2.44519/28) * 28 = floor(43.82) * 28 = 1204  (812*1204 = 977,648 <= max)
    assert model_input_hw(2000, 3000, factor=28, min_pixels=3136, max_pixels=1003520) == (812, 1204)


def test_model_input_hw_min_pixels_clamp():
    # 20x30: rounded 28x28 = 784 < 3136, so beta = sqrt(3136/600) = 2.28619;
    # h = ceil(20*2.28619/28)*28 = ceil(1.633)*28 = 56; w = ceil(30*2.28619/28)*28 = ceil(2.449)*28 = 84
    assert model_input_hw(20, 30, factor=28, min_pixels=3136, max_pixels=12845056) == (56, 84)


def test_model_input_hw_uses_the_given_factor():
    # factor 32: round(450/32) = round(14.06) = 14 -> 448; round(600/32) = round(18.75) = 19 -> 608
    assert model_input_hw(450, 600, factor=32, min_pixels=1024, max_pixels=10**8) == (448, 608)


def test_rescale_and_named_frames():
    orig, inp = (450, 600), (448, 588)
    box = [60.0, 45.0, 300.0, 225.0]
    # x * 588/600 = x * 0.98: 60 -> 58.8, 300 -> 294; y * 448/450: 45 -> 44.8, 225 -> 224
    m = to_model_frame(box, orig, inp)
    np.testing.assert_allclose(m, [58.8, 44.8, 294.0, 224.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(to_original_frame(m, inp, orig), box, rtol=0, atol=1e-12)
    assert rescale_box(box, orig, inp) == m
    with pytest.raises(ValueError, match="positive"):
        rescale_box(box, (0, 600), inp)


# ----------------------------------------------------------------------------- properties
coord = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)
box_st = st.lists(coord, min_size=4, max_size=4)
wild_box_st = st.lists(st.one_of(coord, any_float), min_size=4, max_size=4)
valid_box_st = st.tuples(coord, coord, st.floats(1e-3, 1e4), st.floats(1e-3, 1e4)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


def _reference_iou(a, b):
    """Independent plain-Python IoU for the properties below."""
    if not all(math.isfinite(v) for v in a + b):
        return 0.0
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@settings(max_examples=150, deadline=None)
@given(wild_box_st, wild_box_st)
def test_iou_symmetric_bounded_never_raises(a, b):
    v = iou(a, b)
    assert 0.0 <= v <= 1.0
    assert v == iou(b, a)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(box_st, box_st), min_size=1, max_size=6))
def test_scalar_rowwise_matrix_and_reference_agree(pairs):
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    scalar = [iou(x, y) for x, y in pairs]
    rows = pairwise_iou(a, b)
    diag = np.diag(iou_matrix(a, b))
    ref = [_reference_iou(list(map(float, x)), list(map(float, y))) for x, y in pairs]
    assert rows.tolist() == scalar
    assert diag.tolist() == scalar
    np.testing.assert_allclose(scalar, ref, rtol=1e-9, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(box_st,
       st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
       st.tuples(st.integers(1, 5000), st.integers(1, 5000)))
def test_rescale_round_trip(box, orig_hw, input_hw):
    back = to_original_frame(to_model_frame(box, orig_hw, input_hw), input_hw, orig_hw)
    np.testing.assert_allclose(back, box, rtol=1e-12, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(valid_box_st, valid_box_st, st.floats(0.01, 100.0))
def test_iou_invariant_to_uniform_scaling(a, b, s):
    # scaling both boxes by the same factor leaves IoU unchanged (up to rounding)
    sa = [v * s for v in a]
    sb = [v * s for v in b]
    assert iou(sa, sb) == pytest.approx(iou(a, b), abs=1e-9)
