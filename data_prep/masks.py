"""Source masks -> boxes for the dataset converters (docs/method.md §7): reading a mask file, binarising
it, the box rules, the checks of a mask against its image.

Pixel convention (the project's box convention, see ``medloc/data/records.py``)
---------------------------------------------------------------------------------
A pixel at column ``c``, row ``r`` covers the continuous square ``[c, c+1) x [r, r+1)``. A mask
whose foreground spans columns ``x0..x1`` and rows ``y0..y1`` (inclusive indices) therefore gives
the box ``[x0, y0, x1 + 1, y1 + 1]``; its area ``(x2-x1)*(y2-y1)`` equals the number of pixels of a
filled rectangle. Example: a 3x2 rectangle at columns 4..6, rows 10..11 -> ``[4, 10, 7, 12]``,
area 3*2 = 6.

Mask -> box rules (``MaskRule``)
--------------------------------
- ``"union"`` (default, docs/method.md §7): the box around all foreground pixels.
- ``"largest"``: the box of the largest connected component (most pixels; ties go to the
  component that comes first in raster order). Components use 8-connectivity: pixels touching
  at a corner belong to one nodule (this is why the converter's multi-nodule count differs from
  the 4-connectivity figure quoted for TN3K; ``data_prep/tn3k.py`` gives both numbers).
Masks are binarised with ``value > threshold`` (threshold 127 by default: TN3K masks are lossy
JPEG, so 0/255 comes back as values near 0 and near 255).

How a mask file is read (``read_mask``)
---------------------------------------
The value compared with the threshold is, per pixel:
- grey masks (``L``, ``1``, 16-bit, float): the grey level (``1``: 0/255);
- palette masks (``P``, ``PA``): the palette COLOUR of the index (never the index itself), plus
  the palette's transparency as alpha, then as below;
- colour masks (``RGB``): the brightest channel (a red lesion on black counts);
- masks with alpha (``LA``, ``RGBA``, palette with transparency):
  - alpha the same everywhere -> alpha is ignored, the colour decides;
  - colour the same everywhere but alpha varies -> the lesion is drawn ONLY in alpha: alpha
    decides (``mask_channel: "alpha"`` in the record's provenance);
  - both vary -> what the mask shows over black: colour x alpha / max alpha
    (``mask_channel: "colour*alpha"``).

Suspicious masks (``mask_coverage_problem``)
--------------------------------------------
A mask whose foreground covers (almost) the whole frame gives a box that is (almost) the whole
image: the usual causes are an inverted mask (lesion 0, background 255) or a lesion held in a
channel read differently. Such a mask is bad input unless the user says it is meant
(``allow_full_frame_mask=True`` / ``--allow-full-frame-mask``). It is flagged when
- its foreground covers more than ``max_mask_fraction`` of the pixels (``--max-mask-fraction``,
  default ``DEFAULT_MAX_MASK_FRACTION`` = 0.95: "almost the whole frame"), or
- its foreground fills the whole image border while some background remains inside: the
  background is then an island surrounded by foreground, the signature of an inverted mask of
  a lesion that does not touch the border, whatever its size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image
from scipy import ndimage

from data_prep.bad_input import BadInput
from medloc.data.dataset import ImageLoadError, load_image

MaskRule = Literal["union", "largest"]
MASK_RULES: tuple[str, ...] = get_args(MaskRule)

# 0/255 masks (and their JPEG-compressed versions) binarise at > 127 (docs/method.md §7, TN3K).
DEFAULT_MASK_THRESHOLD = 127
# "Almost the whole frame" (module docstring, Suspicious masks): a mask whose foreground covers
# more than this share of the image is bad input unless --allow-full-frame-mask. Our choice (the
# paper is silent): a lesion or nodule filling more than 95% of the frame is rare enough that the
# user should look at it. This catches inverted masks of lesions under 5% of the frame and masks
# read as all-foreground; inverted masks of larger lesions are caught by the border rule.
DEFAULT_MAX_MASK_FRACTION = 0.95

# 8-connectivity structuring element for scipy.ndimage.label.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class EmptyMaskError(ValueError):
    """A mask has no foreground pixel after binarisation."""


def check_mask_rule(rule: str) -> MaskRule:
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule {rule!r} is not one of {list(MASK_RULES)}")
    return rule  # type: ignore[return-value]


MaskChannel = Literal["colour", "alpha", "colour*alpha"]


def _max_value(arr: np.ndarray) -> float:
    return float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else 1.0


def mask_values(mask: np.ndarray) -> tuple[np.ndarray, MaskChannel]:
    """The per-pixel value a mask is thresholded on, and where it came from.

    ``mask``: ``[H, W]`` (grey or bool) or ``[H, W, C]`` with C = 1 (grey), 2 (grey + alpha),
    3 (RGB) or 4 (RGBA). Colour = the brightest channel. Alpha, when present, follows the rule of
    the module docstring: constant alpha is ignored; constant colour with varying alpha means
    the lesion is in alpha; both varying gives colour x alpha / max alpha.
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    if mask.ndim == 2:
        return mask, "colour"
    if mask.ndim != 3 or mask.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"a mask must be [H, W] or [H, W, C<=4], got shape {mask.shape}")
    n_colour = 1 if mask.shape[2] <= 2 else 3
    colour_channels = mask[:, :, :n_colour]
    colour = colour_channels.max(axis=2)
    if mask.shape[2] in (1, 3):
        return colour, "colour"
    alpha = mask[:, :, -1]
    if (alpha == alpha.flat[0]).all():
        return colour, "colour"
    if (colour_channels == colour_channels[:1, :1, :]).all():
        return alpha, "alpha"
    over_black = colour.astype(np.float64) * (alpha.astype(np.float64) / _max_value(alpha))
    return over_black, "colour*alpha"


def binarize_mask(mask: np.ndarray, threshold: int = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Foreground = ``value > threshold`` with the value of ``mask_values``.

    ``mask``: ``[H, W]`` or ``[H, W, C]``. Returns a boolean ``[H, W]`` array.
    """
    values, _ = mask_values(mask)
    return values > threshold


def mask_coverage_problem(mask: np.ndarray, max_fraction: float) -> str | None:
    """Why a boolean mask looks like a full-frame mistake (module docstring), or None."""
    mask = np.asarray(mask, dtype=bool)
    fraction = float(mask.mean()) if mask.size else 0.0
    if fraction > max_fraction:
        return (
            f"foreground covers {fraction:.1%} of the image, more than the "
            f"max_mask_fraction {max_fraction:g}"
        )
    border = np.concatenate([mask[0, :], mask[-1, :], mask[:, 0], mask[:, -1]])
    if border.all() and not mask.all():
        return (
            f"foreground fills the whole image border and surrounds the background "
            f"({fraction:.1%} foreground): the mask looks inverted"
        )
    return None


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of a boolean mask: ``(labels [H, W] int, count)``."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
    return labels, int(count)


def _box_of(mask: np.ndarray) -> list[float]:
    """Continuous xyxy box of the True pixels: ``[x0, y0, x1 + 1, y1 + 1]`` (inclusive x1, y1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


@dataclass(frozen=True)
class MaskBox:
    """Result of ``mask_to_box``: the box and how many components the mask has."""

    box: list[float]
    n_components: int


def mask_to_box(mask: np.ndarray, rule: MaskRule = "union") -> MaskBox:
    """Box of a boolean mask under ``rule`` (see the module docstring for the convention).

    Raises ``EmptyMaskError`` if the mask has no foreground.
    """
    rule = check_mask_rule(rule)
    mask = np.asarray(mask, dtype=bool)
    labels, count = connected_components(mask)
    if count == 0:
        raise EmptyMaskError("mask has no foreground pixel")
    if rule == "union":
        return MaskBox(_box_of(mask), count)
    elif rule == "largest":
        sizes = np.bincount(labels.ravel())[1:]  # pixels per component, labels 1..count
        largest = int(np.argmax(sizes)) + 1  # argmax returns the first maximum: raster order
        return MaskBox(_box_of(labels == largest), count)
    raise AssertionError("unreachable")  # check_mask_rule already rejected other values


# Pillow modes read as they are (grey, grey+alpha, colour, colour+alpha, 16-bit, 32-bit, float).
_DIRECT_MODES = ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16L", "I;16B", "F")


def read_mask(path: str) -> tuple[np.ndarray, MaskChannel]:
    """Read a mask image file: ``(values [H, W], channel)`` per ``mask_values``.

    Palette images are converted through their palette (colours and transparency), so a
    palette index is never taken for an intensity. Raises ``ImageLoadError`` naming the file.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")  # palette colours; tRNS transparency -> alpha
            elif img.mode == "1":
                img = img.convert("L")  # 0/255
            elif img.mode not in _DIRECT_MODES:
                img = img.convert("RGBA" if "A" in img.mode else "RGB")
            arr = np.asarray(img)
    except Exception as exc:
        raise ImageLoadError(path, f"{type(exc).__name__}: {exc}") from exc
    return mask_values(arr)


def load_mask(path: str, threshold: int = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Read a mask image file into a boolean ``[H, W]`` array (``value > threshold``)."""
    values, _ = read_mask(path)
    return values > threshold


@dataclass(frozen=True)
class ImageInfo:
    """What a converter needs to know about one source image (and its mask, when it has one)."""

    width: int
    height: int
    box: list[float] | None = None
    n_components: int = 0
    mask_channel: MaskChannel | None = None  # where the mask's foreground was read from

    def mask_provenance(self) -> dict[str, Any]:
        """``{"mask_channel": ...}`` when the mask was not read from its colour, else ``{}``."""
        if self.mask_channel in (None, "colour"):
            return {}
        return {"mask_channel": self.mask_channel}


def read_image_info(image_path: str, display: str) -> tuple[ImageInfo | None, list[BadInput]]:
    """Decode an image fully (so a truncated file is caught) and return its size.

    ``display`` is the name used in error messages (usually the path relative to the source).
    """
    try:
        image = load_image(image_path)
    except ImageLoadError as exc:
        return None, [BadInput(display, f"unreadable image ({exc.reason})")]
    return ImageInfo(width=image.size[0], height=image.size[1]), []


def check_max_mask_fraction(value: float) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"max_mask_fraction={value}; expected a share in (0, 1]")
    return value


def _empty_mask_reason(values: np.ndarray, threshold: float, max_fraction: float) -> str:
    """Explain an empty mask; suggest a lower threshold only where it would give a real box.

    The only threshold worth suggesting is the smallest value present (``lo``): it keeps every
    pixel above the background level. It is suggested when ``values > lo`` passes the full-frame
    check; a 0/1 mask gets ``--mask-threshold 0``, a mask read as palette indices never did.
    """
    if not values.size:
        return "empty mask: the mask has no pixel"
    lo, top = float(values.min()), float(values.max())
    if lo == top:
        return f"empty mask: every pixel is {top:g}"
    reason = f"empty mask: no pixel > {threshold:g} (values go from {lo:g} to {top:g})"
    lowered = mask_coverage_problem(values > lo, max_fraction)
    if lowered is None:
        hint = " (a 0/1 mask)" if (lo, top) == (0.0, 1.0) else ""
        return (
            reason
            + f"; if the lesion is the pixels above {lo:g}{hint}, pass --mask-threshold {lo:g}"
        )
    return reason + f"; lowering --mask-threshold would not help: above {lo:g} its {lowered}"


def read_image_and_mask(
    image_path: str,
    mask_path: str | None,
    *,
    image_display: str,
    mask_display: str,
    rule: MaskRule,
    threshold: int,
    max_mask_fraction: float = DEFAULT_MAX_MASK_FRACTION,
    allow_full_frame_mask: bool = False,
) -> tuple[ImageInfo | None, list[BadInput]]:
    """Check an image/mask pair and compute the box; every problem found is returned.

    Problems: missing or unreadable image, missing or unreadable mask, mask size different from
    the image size, empty mask, a mask covering (almost) the whole frame (unless
    ``allow_full_frame_mask``; see the module docstring).
    """
    info, bad = read_image_info(image_path, image_display)
    if mask_path is None or not os.path.isfile(mask_path):
        bad.append(BadInput(mask_display, "mask file does not exist"))
        return None, bad
    try:
        values, channel = read_mask(mask_path)
    except ImageLoadError as exc:
        bad.append(BadInput(mask_display, f"unreadable mask ({exc.reason})"))
        return None, bad
    if info is None:
        return None, bad
    h, w = values.shape
    if (w, h) != (info.width, info.height):
        bad.append(
            BadInput(
                mask_display,
                f"mask is {w}x{h} (WxH) but its image {image_display} is "
                f"{info.width}x{info.height}",
            )
        )
        return None, bad
    read_as = "" if channel == "colour" else f" (read from {channel})"
    mask = values > threshold
    try:
        result = mask_to_box(mask, rule)
    except EmptyMaskError:
        reason = _empty_mask_reason(values, threshold, max_mask_fraction)
        bad.append(BadInput(mask_display, reason + read_as))
        return None, bad
    problem = mask_coverage_problem(mask, max_mask_fraction)
    if problem is not None and not allow_full_frame_mask:
        bad.append(
            BadInput(
                mask_display,
                f"full-frame mask{read_as}: {problem}; its box would be {result.box} in the "
                f"{w}x{h} image. Fix the mask (inverted? lesion in another channel?), or pass "
                "--allow-full-frame-mask if it is meant",
            )
        )
        return None, bad
    return ImageInfo(info.width, info.height, result.box, result.n_components, channel), bad
