"""Evaluation metrics (medloc.metrics, docs/method.md §5): hand-worked Acc@t, pseudo-mAP, mean IoU,
parse failures, size terciles, COCO AP, record validation; and box IoU against pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from medloc.boxes import iou, pairwise_iou
from medloc.metrics import (
    PSEUDO_MAP_THRESHOLDS,
    acc_at,
    acc_curve,
    pseudo_map,
    score_predictions,
    size_terciles,
    validate_record,
)

GT = [0.0, 0.0, 10.0, 10.0]  # area 100


def test_acc_at_hand_worked():
    # IoUs [0.9, 0.6, 0.0, miss -> 0.0]: hits at 0.5 are 0.9 and 0.6 -> 2/4 = 50 %;
    # at 0.75 and 0.8 only 0.9 -> 25 %.
    ious = [0.9, 0.6, 0.0, 0.0]
    assert acc_at(ious, 0.5) == 50.0
    assert acc_at(ious, 0.75) == 25.0
    assert acc_at(ious, 0.8) == 25.0


def test_acc_at_operator_on_the_boundary():
    # IoU exactly 0.75: a hit under ">=" (paper), a miss under ">" (early VLM-R1).
    assert acc_at([0.75, 0.5], 0.75, op=">=") == 50.0
    assert acc_at([0.75, 0.5], 0.75, op=">") == 0.0
    with pytest.raises(ValueError, match="op='=>'"):
        acc_at([0.5], 0.5, op="=>")


def test_pseudo_map_hand_worked():
    # Thresholds 0.50, 0.55, ..., 0.95 (10 of them). IoU 0.9 hits the 9 thresholds <= 0.90;
    # IoU 0.6 hits 0.50, 0.55, 0.60. Acc: 50 % at t in {0.50, 0.55, 0.60}, 25 % at the six
    # thresholds 0.65..0.90, 0 % at 0.95. Mean = (3*50 + 6*25 + 0) / 10 = 30 %.
    assert pseudo_map([0.9, 0.6, 0.0, 0.0]) == pytest.approx(30.0, abs=1e-12)


def test_pseudo_map_thresholds_have_no_float_drift():
    # np.arange(0.5, 1.0, 0.05)[4] is 0.7000000000000002, which would make IoU 0.7 miss t = 0.70.
    assert list(PSEUDO_MAP_THRESHOLDS) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    # IoU 0.7 hits 0.50..0.70 -> 5 of 10 thresholds -> 50 %.
    assert pseudo_map([0.7]) == 50.0
    assert acc_curve([0.7])["0.70"] == 100.0


def test_acc_rejects_bad_ious():
    with pytest.raises(ValueError, match="non-empty"):
        acc_at([], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc_at([0.5, float("nan")], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc_at([1.2], 0.5)


def test_size_terciles_by_rank():
    # 7 areas -> groups of 3, 2, 2 by ascending area (ties keep input order).
    labels = size_terciles([50, 10, 30, 30, 70, 20, 60])
    # sorted: 10(i1) 20(i5) 30(i2) | 30(i3) 50(i0) | 60(i6) 70(i4)
    assert list(labels) == ["medium", "small", "small", "medium", "large", "small", "large"]


def _rec(i, pred, gt=GT, **kw):
    return {"id": f"s{i}", "pred_box": pred, "gt_box": gt, **kw}


def test_score_predictions_hand_worked():
    # Against GT [0,0,10,10]: [0,0,10,9] -> IoU 0.9; [0,0,10,6] -> 0.6; a far box -> 0;
    # null -> parse failure (IoU 0).
    recs = [_rec(0, [0, 0, 10, 9]), _rec(1, [0, 0, 10, 6]), _rec(2, [20, 20, 30, 30]),
            _rec(3, None)]
    m = score_predictions(recs)
    assert m["n"] == 4
    assert m["acc@0.5"] == 50.0 and m["acc@0.75"] == 25.0 and m["acc@0.8"] == 25.0
    assert m["pseudo_map"] == pytest.approx(30.0, abs=1e-9)
    assert m["mean_iou"] == pytest.approx((0.9 + 0.6) / 4, abs=1e-12)  # 0.375
    assert m["parse_fail_rate"] == 25.0 and m["n_parse_fail"] == 1
    assert m["acc_by_threshold"]["0.60"] == 50.0 and m["acc_by_threshold"]["0.95"] == 0.0
    assert "coco_ap" not in m  # no confidences given


def test_score_predictions_by_size():
    # GT boxes [0,0,s,s] with s = 2, 4 (small), 6, 8 (medium), 10, 12 (large).
    # small: one exact hit, one miss -> 50 %; medium: both exact -> 100 %; large: null + far -> 0 %.
    recs = [
        _rec(0, [0, 0, 2, 2], [0, 0, 2, 2]), _rec(1, [50, 50, 60, 60], [0, 0, 4, 4]),
        _rec(2, [0, 0, 6, 6], [0, 0, 6, 6]), _rec(3, [0, 0, 8, 8], [0, 0, 8, 8]),
        _rec(4, None, [0, 0, 10, 10]), _rec(5, [90, 90, 99, 99], [0, 0, 12, 12]),
    ]
    m = score_predictions(recs)
    assert m["acc@0.5_by_size"] == {"small": 50.0, "medium": 100.0, "large": 0.0}
    assert m["n_by_size"] == {"small": 2, "medium": 2, "large": 2}
    assert m["acc@0.5"] == 50.0


def test_coco_ap_hand_worked():
    # Four images, one GT each. Detections (confidence): a IoU 1.0 (0.9); b IoU 0.72 (0.8)
    # ([0,0,10,7.2] -> 72/100); c IoU 0 (0.7); d none.
    # At t <= 0.70 (5 COCO thresholds) the ranked detections are TP, TP, FP: recall 0.25, 0.5,
    # 0.5 with precision 1, 1, 2/3 -> interpolated precision 1 at the 51 recall points
    # 0.00..0.50 of 101 -> AP_t = 51/101.
    # At t >= 0.75 (5 thresholds): TP, FP, FP -> precision 1 at the 26 points 0.00..0.25
    # -> AP_t = 26/101. AP = (5*51 + 5*26) / (10*101) = 385/1010.
    recs = [_rec(0, GT, confidence=0.9), _rec(1, [0, 0, 10, 7.2], confidence=0.8),
            _rec(2, [20, 20, 30, 30], confidence=0.7), _rec(3, None)]
    m = score_predictions(recs)
    assert m["coco_ap50"] == pytest.approx(100 * 51 / 101, abs=1e-9)
    assert m["coco_ap75"] == pytest.approx(100 * 26 / 101, abs=1e-9)
    assert m["coco_ap"] == pytest.approx(100 * 385 / 1010, abs=1e-9)


def test_coco_ap_depends_on_confidence_order():
    # Same boxes, but the miss is now the most confident: at t = 0.5 the ranking is FP, TP, TP:
    # precision 0, 1/2, 2/3 at recall 0, 0.25, 0.5 -> interpolated 2/3 at 51 points ->
    # AP50 = 51/101 * 2/3. (Acc@t, which ignores confidence, is unchanged.)
    recs = [_rec(0, GT, confidence=0.5), _rec(1, [0, 0, 10, 7.2], confidence=0.4),
            _rec(2, [20, 20, 30, 30], confidence=0.9), _rec(3, None)]
    m = score_predictions(recs)
    assert m["coco_ap50"] == pytest.approx(100 * 51 / 101 * 2 / 3, abs=1e-9)
    assert m["acc@0.5"] == 50.0


def test_partial_confidence_is_an_error():
    recs = [_rec(0, GT, confidence=0.9), _rec(1, GT)]
    with pytest.raises(ValueError, match="id 's1'"):
        score_predictions(recs)


def test_score_predictions_rejects_bad_records():
    with pytest.raises(ValueError, match="record 1: duplicate id 's0'"):
        score_predictions([_rec(0, GT), _rec(0, GT)])
    with pytest.raises(ValueError, match="no prediction records"):
        score_predictions([])


@pytest.mark.parametrize(
    "obj, match",
    [
        ([1, 2], "expected a JSON object"),
        ({"id": "a", "gt_box": GT}, "missing key 'pred_box'"),
        ({"id": "a", "pred_box": [1, 2, 3], "gt_box": GT}, "'pred_box' must be a list of 4"),
        ({"id": "a", "pred_box": [1, 2, 3, True], "gt_box": GT}, "'pred_box' must be a list"),
        ({"id": "a", "pred_box": None, "gt_box": [0, 0, 0, 5]}, "has no area"),
        ({"id": "a", "pred_box": [0, 0, float("inf"), 1], "gt_box": GT}, "non-finite"),
        ({"id": "a", "pred_box": None, "gt_box": GT, "confidence": "high"}, "'confidence'"),
        ({"id": None, "pred_box": None, "gt_box": GT}, "'id' must be"),
    ],
)
def test_validate_record_errors(obj, match):
    with pytest.raises(ValueError, match=match):
        validate_record(obj)


def test_box_iou_matches_pycocotools_on_random_boxes():
    # medloc.boxes IoU (xyxy, continuous) vs pycocotools.mask.iou (xywh, iscrowd=0).
    rng = np.random.default_rng(0)
    n = 500
    xy = rng.uniform(0, 100, size=(2, n, 2))
    wh = rng.uniform(0.5, 60, size=(2, n, 2))
    a = np.concatenate([xy[0], xy[0] + wh[0]], axis=1)  # [n, 4] xyxy
    b = np.concatenate([xy[1], xy[1] + wh[1]], axis=1)
    # Nested and identical pairs as well as random ones.
    b[:50] = a[:50]
    b[50:100, :2] = a[50:100, :2] + 1.0
    b[50:100, 2:] = a[50:100, 2:] - 0.25
    ref = mask_utils.iou(
        [list(np.r_[p[:2], p[2:] - p[:2]]) for p in a],
        [list(np.r_[g[:2], g[2:] - g[:2]]) for g in b],
        [0] * n,
    )  # [n, n]
    ours = pairwise_iou(a, b)  # [n]
    np.testing.assert_allclose(ours, np.diag(ref), rtol=0, atol=1e-12)
    assert (ours[:50] == 1.0).all() and (ours > 0).sum() > 150
    for i in range(0, n, 97):
        assert iou(a[i], b[i]) == pytest.approx(ref[i, i], abs=1e-12)
