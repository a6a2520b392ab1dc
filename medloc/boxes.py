"""Box geometry in one convention (docs/method.md §1, §5).

Convention, used everywhere in medloc:

- A box is four floats ``[x1, y1, x2, y2]`` in pixels, x to the right, y down.
- Coordinates are *continuous*: the box covers ``x1 <= x <= x2``, so its area is
  ``(x2 - x1) * (y2 - y1)`` (no ``+1`` as in some pixel-inclusive conventions).
- A box is *valid* when all four numbers are finite and it has positive area
  (``x2 > x1`` and ``y2 > y1``). Any IoU involving an invalid box is 0.0: a degenerate
  prediction is a miss, never an exception.
- Ground truth lives in ORIGINAL-image pixels; Qwen2.5-VL answers in MODEL-INPUT pixels (the
  image after ``smart_resize``). :func:`to_original_frame` maps a prediction back before any IoU.

Everything here is numpy / plain Python; nothing knows about text, models or thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BoxLike = Sequence[float] | np.ndarray

__all__ = [
    "area",
    "as_box_array",
    "clip_box",
    "iou",
    "iou_matrix",
    "is_valid_box",
    "model_input_hw",
    "pairwise_iou",
    "rescale_box",
    "to_model_frame",
    "to_original_frame",
]


def _as_box(box: BoxLike) -> np.ndarray:
    """One box as a float64 array of shape [4]; raises ValueError on the wrong shape."""
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape != (4,):
        raise ValueError(f"a box must have 4 numbers [x1, y1, x2, y2], got shape {arr.shape}")
    return arr


def as_box_array(boxes: Sequence[BoxLike | None] | np.ndarray) -> np.ndarray:
    """Stack boxes into a float64 array ``[N, 4]``; ``None`` (a parse failure) becomes a NaN row.

    A NaN row is an invalid box, so its IoU with anything is 0.0 (docs/method.md §5: an unparseable
    answer counts as IoU 0).
    """
    if isinstance(boxes, np.ndarray):
        arr = boxes.astype(np.float64, copy=False)
        if arr.ndim == 1 and arr.shape[0] == 0:
            arr = arr.reshape(0, 4)
    else:
        rows = [np.full(4, np.nan) if b is None else _as_box(b) for b in boxes]
        arr = np.stack(rows) if rows else np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {arr.shape}")
    return arr


def _valid_mask(boxes: np.ndarray) -> np.ndarray:
    """[..., 4] -> [...] bool: all finite and strictly positive width and height."""
    finite = np.isfinite(boxes).all(axis=-1)
    with np.errstate(invalid="ignore"):
        positive = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return finite & positive


def is_valid_box(box: BoxLike) -> bool:
    """True when the box is finite with positive width and height."""
    return bool(_valid_mask(_as_box(box)))


def area(box: BoxLike) -> float:
    """Continuous area ``(x2 - x1) * (y2 - y1)``; 0.0 for an invalid box."""
    b = _as_box(box)
    if not _valid_mask(b):
        return 0.0
    return float((b[2] - b[0]) * (b[3] - b[1]))


def _pairwise_iou_arrays(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable box arrays ``[..., 4]`` -> ``[...]``; 0.0 where either box is invalid."""
    valid = _valid_mask(a) & _valid_mask(b)
    with np.errstate(invalid="ignore", over="ignore"):
        ix1 = np.maximum(a[..., 0], b[..., 0])
        iy1 = np.maximum(a[..., 1], b[..., 1])
        ix2 = np.minimum(a[..., 2], b[..., 2])
        iy2 = np.minimum(a[..., 3], b[..., 3])
        inter = np.clip(ix2 - ix1, 0.0, None) * np.clip(iy2 - iy1, 0.0, None)
        area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
        area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        union = area_a + area_b - inter
        out = np.where(valid & (union > 0), inter / np.where(union > 0, union, 1.0), 0.0)
    # Finite huge boxes can overflow to inf/inf = NaN; such a pair is treated as a miss. The clip
    # guards the last ulp of rounding so the result is always in [0, 1].
    out = np.where(np.isfinite(out), out, 0.0)
    return np.clip(out, 0.0, 1.0)


def iou(a: BoxLike, b: BoxLike) -> float:
    """Intersection over union of two boxes, in [0, 1]; 0.0 if either box is invalid."""
    return float(_pairwise_iou_arrays(_as_box(a), _as_box(b)))


def pairwise_iou(a: Sequence[BoxLike | None] | np.ndarray,
                 b: Sequence[BoxLike | None] | np.ndarray) -> np.ndarray:
    """Row-by-row IoU: ``a [N, 4]``, ``b [N, 4]`` -> ``[N]`` with ``out[i] = iou(a[i], b[i])``.

    This is the reward/eval path: prediction i against its own ground truth i. ``None`` rows
    (parse failures) give 0.0.
    """
    aa, bb = as_box_array(a), as_box_array(b)  # [N, 4], [N, 4]
    if aa.shape != bb.shape:
        raise ValueError(f"pairwise_iou needs equal shapes, got {aa.shape} and {bb.shape}")
    return _pairwise_iou_arrays(aa, bb)  # [N]


def iou_matrix(a: Sequence[BoxLike | None] | np.ndarray,
               b: Sequence[BoxLike | None] | np.ndarray) -> np.ndarray:
    """All-pairs IoU: ``a [N, 4]``, ``b [M, 4]`` -> ``[N, M]`` with ``out[i, j] = iou(a[i], b[j])``."""
    aa, bb = as_box_array(a), as_box_array(b)  # [N, 4], [M, 4]
    return _pairwise_iou_arrays(aa[:, None, :], bb[None, :, :])  # [N, M]


def clip_box(box: BoxLike, height: float, width: float) -> list[float]:
    """Clamp x to [0, width] and y to [0, height]. NaN stays NaN (still an invalid box)."""
    b = _as_box(box)
    if not (height > 0 and width > 0):
        raise ValueError(f"clip_box needs positive height and width, got {height}x{width}")
    x1, y1, x2, y2 = b
    return [
        float(np.clip(x1, 0.0, width)),
        float(np.clip(y1, 0.0, height)),
        float(np.clip(x2, 0.0, width)),
        float(np.clip(y2, 0.0, height)),
    ]


def model_input_hw(height: int, width: int, *, factor: int, min_pixels: int,
                   max_pixels: int) -> tuple[int, int]:
    """Height and width of the image the model sees, by the processor's own resize rule (docs/method.md §1).

    Delegates to ``transformers``' ``smart_resize`` for Qwen2-VL / Qwen2.5-VL: both sides rounded
    to a multiple of ``factor`` (= ``patch_size * merge_size`` read from the processor, 28 for
    Qwen2.5-VL) and the pixel count clamped to ``[min_pixels, max_pixels]``. ``factor`` is always
    passed in so that no patch-size literal lives in this module.
    """
    # Imported here: the transformers image-processing module pulls in torch/torchvision, which
    # the pure-geometry functions of this module do not need.
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    h, w = smart_resize(int(height), int(width), factor=int(factor), min_pixels=int(min_pixels),
                        max_pixels=int(max_pixels))
    return int(h), int(w)


def rescale_box(box: BoxLike, src_hw: tuple[float, float], dst_hw: tuple[float, float]) -> list[float]:
    """Map a box from an image of size ``src_hw = (H, W)`` to one of size ``dst_hw``.

    x scales by ``W_dst / W_src`` and y by ``H_dst / H_src`` (the resize is anisotropic after
    rounding to multiples of the patch factor).
    """
    b = _as_box(box)
    (sh, sw), (dh, dw) = src_hw, dst_hw
    if min(sh, sw, dh, dw) <= 0:
        raise ValueError(f"image sizes must be positive, got src_hw={src_hw}, dst_hw={dst_hw}")
    sx, sy = dw / sw, dh / sh
    return [float(b[0] * sx), float(b[1] * sy), float(b[2] * sx), float(b[3] * sy)]


def to_model_frame(box: BoxLike, orig_hw: tuple[float, float],
                   input_hw: tuple[float, float]) -> list[float]:
    """Original-image pixels -> model-input pixels (e.g. to write an SFT target answer)."""
    return rescale_box(box, orig_hw, input_hw)


def to_original_frame(box: BoxLike, input_hw: tuple[float, float],
                      orig_hw: tuple[float, float]) -> list[float]:
    """Model-input pixels (what Qwen2.5-VL answers) -> original-image pixels (where GT lives)."""
    return rescale_box(box, input_hw, orig_hw)
