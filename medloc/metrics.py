"""Grounding metrics as the paper reports them (docs/method.md §5), plus COCO AP beyond the paper.

One prediction per sample. A sample is a *hit* at threshold t when IoU >= t (the comparison operator
is an explicit argument: early VLM-R1 used a strict ``>``). An unparseable answer (no box) has
IoU 0: it is a miss at every threshold, and is also counted separately as a parse failure.

- ``acc_at(ious, t)``: Acc@t, percent of samples that are hits.
- ``pseudo_map(ious)``: mean of Acc@t over t in {0.50, 0.55, ..., 0.95} (percent).
- ``score_predictions(records)``: every number of a ``metrics.json``.
- ``read_predictions(path)``: a predictions JSONL file, every line checked (``validate_record``).
- ``answer_confidence(token_logprobs, token_texts)``: a box's confidence for COCO AP, the
  geometric mean of its answer tokens' probabilities (those inside ``<answer>...</answer>``).

IoU itself comes from ``medloc.boxes`` (the same function training rewards use).

Units (one rule for every key of a ``metrics.json``): counts are ``n`` / ``n_*``; every accuracy,
rate and AP is in PERCENT (0-100: ``acc@*``, ``acc_by_threshold``, ``acc@0.5_by_size``,
``pseudo_map``, ``parse_fail_rate``, ``invalid_box_rate``, ``coco_ap*``), as the paper's tables
print them; IoU values stay IoU, a FRACTION (0-1: ``mean_iou``). The tables (``eval.table``)
print them in these units.

Bad values: a predicted box with x2 < x1 or y2 < y1 (inverted) or with no area (empty) is scored
as what it is, IoU 0 (a miss), and counted apart: ``n_invalid_box`` / ``invalid_box_rate``
(``invalid_boxes`` lists them; ``eval.score`` names their lines). ``confidence`` is optional for
the file as a whole: give it on every line with a predicted box (COCO AP is computed) or on none
(COCO AP is left out); a file where only some predicted boxes have one is an error naming the first
line without it (``read_predictions``), since COCO AP over part of the boxes would mean nothing.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from medloc.boxes import pairwise_iou
from medloc.jsonl import JsonlError, read_jsonl
from medloc.parsing import ANSWER_CLOSE, ANSWER_OPEN

HitOp = Literal[">=", ">"]

PSEUDO_MAP_THRESHOLDS: np.ndarray = np.round(0.50 + 0.05 * np.arange(10), 2)
"""0.50, 0.55, ..., 0.95 (docs/method.md §5), rounded so that e.g. 0.7 is exactly the float 0.7."""

REPORTED_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.8)
"""The Acc@t columns of ``score_predictions`` (docs/method.md §5)."""

SIZE_TERCILES: tuple[str, ...] = ("small", "medium", "large")


def _as_ious(ious: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ious, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ious must be a non-empty 1-D sequence; got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ValueError("ious must be finite numbers in [0, 1] (a miss is 0.0, not None/NaN)")
    return arr


def hits_at(ious: Sequence[float] | np.ndarray, t: float, op: HitOp = ">=") -> np.ndarray:
    """Boolean hit per sample: ``IoU >= t`` (or ``IoU > t`` with ``op=">"``)."""
    arr = _as_ious(ious)
    if op == ">=":
        return arr >= t
    if op == ">":
        return arr > t
    raise ValueError(f"op={op!r}; expected one of {get_args(HitOp)}")


def acc_at(ious: Sequence[float] | np.ndarray, t: float, op: HitOp = ">=") -> float:
    """Acc@t in percent: 100 * (number of samples with IoU op t) / (number of samples)."""
    return float(100.0 * hits_at(ious, t, op).mean())


def acc_curve(
    ious: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray = PSEUDO_MAP_THRESHOLDS,
    op: HitOp = ">=",
) -> dict[str, float]:
    """Acc@t for every t, keyed by the threshold written with two decimals (``"0.50"``)."""
    return {f"{t:.2f}": acc_at(ious, float(t), op) for t in thresholds}


def pseudo_map(ious: Sequence[float] | np.ndarray, op: HitOp = ">=") -> float:
    """Pseudo-mAP in percent: mean of Acc@t over t = 0.50:0.05:0.95 (docs/method.md §5)."""
    return float(np.mean([acc_at(ious, float(t), op) for t in PSEUDO_MAP_THRESHOLDS]))


def size_terciles(areas: Sequence[float] | np.ndarray) -> np.ndarray:
    """Label each sample ``"small"``, ``"medium"`` or ``"large"`` by the rank of its GT box area.

    Samples are sorted by area (stable, so ties keep input order) and cut into three groups whose
    sizes differ by at most one, the first groups taking the remainder (``np.array_split``): with
    10 samples the groups hold 4, 3 and 3. Rank-based cuts keep the groups equal in size even when
    many boxes share one area.
    """
    arr = np.asarray(areas, dtype=np.float64)
    order = np.argsort(arr, kind="stable")
    labels = np.empty(arr.shape[0], dtype=object)
    for name, idx in zip(SIZE_TERCILES, np.array_split(order, 3)):
        labels[idx] = name
    return labels


def validate_record(obj: Any) -> dict[str, Any]:
    """Check one prediction record and return it normalised; raise ValueError saying what is wrong.

    Expected: ``{"id": str|int, "pred_box": [x1,y1,x2,y2] | null, "gt_box": [x1,y1,x2,y2],
    "confidence": number | null (optional)}``, boxes in original-image pixels. The GT box must be
    finite with x2 > x1 and y2 > y1. A predicted box must be four finite numbers (an inverted or
    empty one scores IoU 0 and is counted apart: ``invalid_boxes``). Other keys are kept untouched.
    """
    if not isinstance(obj, dict):
        # Bad content of a data file is a ValueError throughout (TypeError is for programming errors).
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    for key in ("id", "pred_box", "gt_box"):
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise ValueError(f"'id' must be a string or integer, got {obj['id']!r}")  # noqa: TRY004
    gt = _box_or_raise("gt_box", obj["gt_box"])
    if not (gt[2] > gt[0] and gt[3] > gt[1]):
        raise ValueError(f"'gt_box' {gt} has no area (expected x2 > x1 and y2 > y1)")
    pred = None if obj["pred_box"] is None else _box_or_raise("pred_box", obj["pred_box"])
    conf = obj.get("confidence")
    if conf is not None and (not _is_number(conf) or not math.isfinite(conf)):
        raise ValueError(f"'confidence' must be a finite number or null, got {conf!r}")
    return {**obj, "pred_box": pred, "gt_box": gt, "confidence": conf}


class PredictionFileError(ValueError):
    """A predictions file with malformed lines; ``problems`` lists ``(line_number, message)``."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        self.path = path
        self.problems = problems
        shown = "\n".join(f"{path}:{line}: {msg}" for line, msg in problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} malformed line(s) in {path}:\n{shown}{more}")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a predictions JSONL file; raise PredictionFileError naming bad lines."""
    return [rec for _, rec in read_predictions_with_lines(path)]


def read_predictions_with_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``read_predictions`` with each record's line number (1-based), for messages.

    Besides each line's own checks: ``confidence`` on some predicted boxes and not on others is
    an error naming the first line without one (module doc)."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    line_of: list[int] = []
    problems: list[tuple[int, str]] = []
    first_line_of: dict[str, int] = {}
    for line_no, value in read_jsonl(path, bad="keep"):
        if isinstance(value, JsonlError):
            problems.append((line_no, value.problem))
            continue
        try:
            rec = validate_record(value)
        except ValueError as err:
            problems.append((line_no, str(err)))
            continue
        key = str(rec["id"])
        if key in first_line_of:
            msg = f"duplicate id {rec['id']!r} (first on line {first_line_of[key]})"
            problems.append((line_no, msg))
            continue
        first_line_of[key] = line_no
        records.append(rec)
        line_of.append(line_no)
    if problems:
        raise PredictionFileError(path, problems)
    if not records:
        raise PredictionFileError(path, [(0, "no prediction records in the file")])
    boxed = [(line, r) for line, r in zip(line_of, records) if r["pred_box"] is not None]
    with_conf = [line for line, r in boxed if r["confidence"] is not None]
    if with_conf and len(with_conf) < len(boxed):
        first = next(line for line, r in boxed if r["confidence"] is None)
        raise PredictionFileError(path, [(first, (
            f"'confidence' missing for a predicted box while {len(with_conf)} of {len(boxed)} "
            f"predicted boxes have one (first on line {with_conf[0]}); give every predicted box a "
            f"confidence (for COCO AP) or none"))])
    return list(zip(line_of, records))


def invalid_boxes(records: Iterable[Mapping[str, Any]]) -> list[tuple[int, str]]:
    """``(index, "inverted" | "empty")`` of every record whose ``pred_box`` has x2 < x1 or y2 < y1
    (inverted) or otherwise no area (empty); ``medloc.parsing.box_problem``'s rule."""
    from medloc.parsing import box_problem

    out = []
    for i, r in enumerate(records):
        box = r.get("pred_box")
        problem = box_problem(tuple(float(v) for v in box)) if box is not None else None
        if problem is not None:
            out.append((i, problem))
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _box_or_raise(name: str, value: Any) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(_is_number(v) for v in value)):
        raise ValueError(f"{name!r} must be a list of 4 numbers [x1, y1, x2, y2], got {value!r}")
    box = [float(v) for v in value]
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{name!r} has a non-finite coordinate: {value!r}")
    return box


def coco_ap(
    pred_boxes: Sequence[Sequence[float] | None],
    gt_boxes: Sequence[Sequence[float]],
    confidences: Sequence[float | None],
) -> dict[str, float]:
    """COCO box AP, AP50 and AP75 in percent, via pycocotools' COCOeval (beyond the paper, §5).

    Each sample is one image with one ground-truth box (category 1) and at most one detection
    (``None`` = no detection: that GT simply counts against recall). Boxes are xyxy and converted
    to COCO's xywh here.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for i, (pred, gt, conf) in enumerate(zip(pred_boxes, gt_boxes, confidences, strict=True)):
        image_id = i + 1
        images.append({"id": image_id})
        w, h = gt[2] - gt[0], gt[3] - gt[1]
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1,
                            "bbox": [gt[0], gt[1], w, h], "area": w * h, "iscrowd": 0})
        if pred is not None:
            if conf is None:
                raise ValueError(f"sample {i} has a predicted box but no confidence")
            detections.append({"image_id": image_id, "category_id": 1, "score": float(conf),
                               "bbox": [pred[0], pred[1], pred[2] - pred[0], pred[3] - pred[1]]})
    if not detections:
        return {"coco_ap": 0.0, "coco_ap50": 0.0, "coco_ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt_api = COCO()
        gt_api.dataset = {"images": images, "annotations": annotations,
                          "categories": [{"id": 1, "name": "finding"}]}
        gt_api.createIndex()
        dt_api = gt_api.loadRes(detections)
        evaluator = COCOeval(gt_api, dt_api, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (max(float(v), 0.0) * 100.0 for v in evaluator.stats[:3])
    return {"coco_ap": ap, "coco_ap50": ap50, "coco_ap75": ap75}


def score_predictions(records: Iterable[Mapping[str, Any]], op: HitOp = ">=") -> dict[str, Any]:
    """All metrics of one predictions file (docs/method.md §5).

    Args:
        records: prediction records (see ``validate_record``); ids must be unique.
        op: hit comparison, ``">="`` (default, paper) or ``">"``.

    Returns a JSON-ready dict:
        ``n``; ``acc@0.5``, ``acc@0.75``, ``acc@0.8``, ``pseudo_map`` (percent);
        ``mean_iou`` (0-1, parse failures count as 0); ``parse_fail_rate`` (percent of records with
        ``pred_box`` null) and ``n_parse_fail``; ``invalid_box_rate`` (percent of records whose
        predicted box is inverted or empty, ``invalid_boxes``) and ``n_invalid_box``; ``acc_by_threshold`` (``{"0.50": .., ...,
        "0.95": ..}``, percent); ``acc@0.5_by_size`` and ``n_by_size`` (``{"small", "medium",
        "large"}``, GT-area terciles, see ``size_terciles``; an empty tercile gives null);
        ``hit_op``; and, only when every record with a predicted box has a ``confidence``,
        ``coco_ap``, ``coco_ap50``, ``coco_ap75`` (percent). If only some have one, ValueError.
    """
    if op not in get_args(HitOp):
        raise ValueError(f"op={op!r}; expected one of {get_args(HitOp)}")
    recs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(records):
        try:
            rec = validate_record(raw)
        except ValueError as err:
            raise ValueError(f"record {i}: {err}") from None
        if str(rec["id"]) in seen:
            raise ValueError(f"record {i}: duplicate id {rec['id']!r}")
        seen.add(str(rec["id"]))
        recs.append(rec)
    if not recs:
        raise ValueError("no prediction records to score")

    preds = [r["pred_box"] for r in recs]
    gts = [r["gt_box"] for r in recs]
    ious = pairwise_iou(preds, gts)  # [n]; None (parse failure) -> 0.0
    n = len(recs)
    n_fail = sum(p is None for p in preds)

    out: dict[str, Any] = {"n": n, "hit_op": op}
    for t in REPORTED_THRESHOLDS:
        out[f"acc@{t:g}"] = acc_at(ious, t, op)
    out["pseudo_map"] = pseudo_map(ious, op)
    out["mean_iou"] = float(ious.mean())
    out["parse_fail_rate"] = 100.0 * n_fail / n
    out["n_parse_fail"] = n_fail
    n_invalid = len(invalid_boxes(recs))  # inverted or empty predicted boxes (IoU 0, a miss)
    out["invalid_box_rate"] = 100.0 * n_invalid / n
    out["n_invalid_box"] = n_invalid
    out["acc_by_threshold"] = acc_curve(ious, PSEUDO_MAP_THRESHOLDS, op)

    areas = np.array([(g[2] - g[0]) * (g[3] - g[1]) for g in gts])
    labels = size_terciles(areas)
    out["acc@0.5_by_size"] = {
        name: (acc_at(ious[labels == name], 0.5, op) if (labels == name).any() else None)
        for name in SIZE_TERCILES
    }
    out["n_by_size"] = {name: int((labels == name).sum()) for name in SIZE_TERCILES}

    with_box = [r for r in recs if r["pred_box"] is not None]
    has_conf = [r["confidence"] is not None for r in with_box]
    if with_box and all(has_conf):
        out.update(coco_ap(preds, gts, [r["confidence"] for r in recs]))
    elif any(has_conf):
        missing = next(r["id"] for r in with_box if r["confidence"] is None)
        raise ValueError(
            f"some predictions have a 'confidence' and some do not (first without: id "
            f"{missing!r}); give every predicted box a confidence for COCO AP, or none"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Confidence of a predicted box (for COCO AP)

def _answer_span(text: str) -> tuple[int, int] | None:
    """Character span of the body of the first ``<answer>`` ... first ``</answer>`` after it (the
    block ``medloc.parsing`` reads the box from); None without a complete block."""
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    body_start = start + len(ANSWER_OPEN)
    body_end = text.find(ANSWER_CLOSE, body_start)
    if body_end < 0:
        return None
    return body_start, body_end


def answer_token_mask(token_texts: Sequence[Sequence[str]], length: int) -> np.ndarray:
    """Which completion tokens hold the answer: ``[n, length]`` bool.

    ``token_texts[i][j]`` is the text of completion token j of row i, for the row's real tokens
    only (``len(token_texts[i]) <= length``; later positions are padding and never marked). The
    row's text is their concatenation. A token is marked when its characters overlap the body
    of the first ``<answer>`` ... ``</answer>`` block, the tags excluded -- so a token that merges
    the tag's ``>`` with the first character of the body counts, the tag tokens themselves do not.
    A token with empty text counts when it sits inside the body. Rows without a complete answer
    block get no marks. Any per-token text works (``tokenizer.decode([id])`` or
    ``tokenizer.convert_ids_to_tokens``) as long as the tags come out intact.
    """
    mask = np.zeros((len(token_texts), length), dtype=bool)  # [n, L]
    for i, pieces in enumerate(token_texts):
        if len(pieces) > length:
            raise ValueError(f"row {i} has {len(pieces)} token texts but length is {length}")
        span = _answer_span("".join(pieces))
        if span is None:
            continue
        body_start, body_end = span
        offset = 0
        for j, piece in enumerate(pieces):
            # characters [offset, offset + len) overlap [body_start, body_end); an empty token is
            # treated as one character wide so that one inside the body counts.
            if offset < body_end and offset + max(len(piece), 1) > body_start:
                mask[i, j] = True
            offset += len(piece)
    return mask


def answer_confidence(token_logprobs: Any, token_texts: Sequence[Sequence[str]]) -> np.ndarray:
    """Confidence of each completion's box: exp of the mean log-probability of its answer tokens.

    Args:
        token_logprobs: ``[n, L]`` log-probability of each completion token under the model
            (numpy array, or a CPU torch tensor); positions past a row's real tokens are ignored.
        token_texts: per row, the text of each real completion token (see ``answer_token_mask``);
            completions are right-padded, as ``medloc.data.collate.append_completions`` makes them.

    Returns ``[n]`` float64 in [0, 1]: the geometric mean of the probabilities of the tokens inside
    the first ``<answer>`` ... ``</answer>`` block (``answer_token_mask``), i.e. of the box as
    written, not of the reasoning before it. Fallback: a row without a complete answer block (or
    with an empty body) averages over all its real tokens, the whole completion. The parsers in
    ``medloc.parsing`` read boxes only from inside an answer block, so for a predicted box the
    fallback does not arise; it keeps the function total. A row with no tokens at all gives NaN.
    """
    logp = np.asarray(token_logprobs, dtype=np.float64)  # [n, L]
    if logp.ndim != 2 or logp.shape[0] != len(token_texts):
        raise ValueError(f"token_logprobs must be [n={len(token_texts)}, L], got shape "
                         f"{logp.shape}")
    length = logp.shape[1]
    answer = answer_token_mask(token_texts, length)  # [n, L]
    n_real = np.array([len(p) for p in token_texts], dtype=np.int64)  # [n]
    real = np.arange(length)[None, :] < n_real[:, None]  # [n, L]
    use = np.where(answer.any(axis=1, keepdims=True), answer, real)  # [n, L]
    counts = use.sum(axis=1)  # [n]
    total = np.where(use, logp, 0.0).sum(axis=1)  # [n]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / counts  # [n]; 0/0 = NaN for an empty row
    return np.exp(mean)
