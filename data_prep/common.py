"""Shared pieces of the dataset converters (PAPER.md §7): mask -> box, bad-input reporting,
deterministic splits, source hashing, manifests and all-or-nothing output writing.

Pixel convention (the project's box convention, see ``medloc/data/records.py``)
---------------------------------------------------------------------------------
A pixel at column ``c``, row ``r`` covers the continuous square ``[c, c+1) x [r, r+1)``. A mask
whose foreground spans columns ``x0..x1`` and rows ``y0..y1`` (inclusive indices) therefore gives
the box ``[x0, y0, x1 + 1, y1 + 1]``; its area ``(x2-x1)*(y2-y1)`` equals the number of pixels of a
filled rectangle. Example: a 3x2 rectangle at columns 4..6, rows 10..11 -> ``[4, 10, 7, 12]``,
area 3*2 = 6.

Mask -> box rules (``MaskRule``)
--------------------------------
- ``"union"`` (default, PAPER.md §7): the box around all foreground pixels.
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

Bad input
---------
Converters check every sample, collect every offender as ``BadInput(file, reason)`` and then
either raise one ``BadInputError`` listing them all (nothing is written) or, with ``--skip-bad``,
leave those samples out and list them under ``"skipped"`` in the manifest. Problems that make the
conversion impossible (no source, unreadable annotation file, ``--out`` naming a file, an empty
source, nothing left after skipping) are ``fatal``: ``--skip-bad`` cannot skip them. Things the
user should know that do not change any box (a CSV read as cp1252, files that match no sample)
are warnings: a ``ConverterWarning`` and the manifest's ``"warnings"`` list. Outputs are written
all-or-nothing: every file goes to a temp file first, and only then are they renamed into place.

File names: an image or mask suffix is matched without regard to case (``ISIC_1.JPG``,
``0001.Png``), the stem exactly; two files that differ only in the suffix's case are ambiguous
and reported.

Text files: CSV files are read as UTF-8 (a BOM is accepted); a CSV that is not UTF-8 (Excel
saves cp1252 on Windows) is read as cp1252 with a warning, and one that is neither is a fatal
error naming the byte. JSON/JSONL files are UTF-8 with or without a BOM (RFC 8259); anything else
is a fatal error naming the byte.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image
from scipy import ndimage

from medloc.atomic import atomic_write_files
from medloc.data.dataset import ImageLoadError, load_image
from medloc.data.records import SPLITS, GroundingRecord, records_to_jsonl

MaskRule = Literal["union", "largest"]
MASK_RULES: tuple[str, ...] = get_args(MaskRule)

# 0/255 masks (and their JPEG-compressed versions) binarise at > 127 (PAPER.md §7, TN3K).
DEFAULT_MASK_THRESHOLD = 127
# "Almost the whole frame" (module docstring, Suspicious masks): a mask whose foreground covers
# more than this share of the image is bad input unless --allow-full-frame-mask. Our choice (the
# paper is silent): a lesion or nodule filling more than 95% of the frame is rare enough that the
# user should look at it. This catches inverted masks of lesions under 5% of the frame and masks
# read as all-foreground; inverted masks of larger lesions are caught by the border rule.
DEFAULT_MAX_MASK_FRACTION = 0.95

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")

# 8-connectivity structuring element for scipy.ndimage.label.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- bad input


@dataclass(frozen=True)
class BadInput:
    """One offending input: the file (or ``file:line``) and what is wrong with it."""

    file: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


class BadInputError(ValueError):
    """Raised by a converter when input is bad; ``offenders`` lists every problem found.

    ``notes`` are warnings collected before the failure (shown after the offenders)."""

    def __init__(
        self,
        dataset: str,
        offenders: Sequence[BadInput],
        *,
        fatal: bool = False,
        notes: Sequence[BadInput] = (),
    ) -> None:
        self.dataset = dataset
        self.offenders = list(offenders)
        self.fatal = fatal
        self.notes = list(notes)
        super().__init__(format_bad_inputs(dataset, self.offenders, fatal=fatal, notes=self.notes))


def format_bad_inputs(
    dataset: str,
    offenders: Sequence[BadInput],
    *,
    fatal: bool = False,
    notes: Sequence[BadInput] = (),
) -> str:
    """The one summary a user reads: every offender with its file and reason."""
    lines = [f"{dataset}: {len(offenders)} bad input(s); nothing was written:"]
    lines += [f"  - {b.file}: {b.reason}" for b in offenders]
    if fatal:
        lines.append("These problems make the conversion impossible; --skip-bad cannot skip them.")
    else:
        lines.append(
            "Fix them, or pass --skip-bad to leave these samples out (listed in the manifest)."
        )
    if notes:
        lines.append(f"Also noted ({len(notes)} warning(s)):")
        lines += [f"  - {b.file}: {b.reason}" for b in notes]
    return "\n".join(lines)


def check_bad_inputs(
    dataset: str, bad: Sequence[BadInput], *, skip_bad: bool, notes: Sequence[BadInput] = ()
) -> None:
    """Raise ``BadInputError`` if there is bad input and skipping was not asked for."""
    if bad and not skip_bad:
        raise BadInputError(dataset, bad, notes=notes)


def fatal(dataset: str, file: str, reason: str, notes: Sequence[BadInput] = ()) -> BadInputError:
    """A fatal ``BadInputError`` about one file (raise the returned exception)."""
    return BadInputError(dataset, [BadInput(file, reason)], fatal=True, notes=notes)


class ConverterWarning(UserWarning):
    """Something the user should know that changes no box (the CLI prints it to stderr)."""


def format_warnings(dataset: str, notes: Sequence[BadInput]) -> str:
    lines = [f"{dataset}: {len(notes)} warning(s):"]
    lines += [f"  - {b.file}: {b.reason}" for b in notes]
    return "\n".join(lines)


def emit_warnings(dataset: str, notes: Sequence[BadInput]) -> None:
    """Issue one ``ConverterWarning`` listing ``notes`` (nothing when there are none)."""
    if notes:
        warnings.warn(format_warnings(dataset, notes), ConverterWarning, stacklevel=3)


def check_has_records(
    dataset: str, records: Sequence[Any], source: str, skipped: Sequence[BadInput], what: str
) -> None:
    """An empty result is never a success: raise a fatal error naming ``source``."""
    if records:
        return
    if skipped:
        reason = f"no record left: all {len(skipped)} bad sample(s) were skipped ({what})"
    else:
        reason = f"no record: {what}"
    raise fatal(dataset, source, reason)


def check_out_dir(dataset: str, out: str) -> None:
    """``out`` must be a folder or creatable as one: a fatal error naming it otherwise."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise fatal(
            dataset,
            out,
            "--out names an existing file; it must be a folder (new or existing) for "
            "<split>.jsonl + manifest.json",
        )
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise fatal(
            dataset, out, f"cannot create the output folder: {parent} is a file, not a folder"
        )


# ----------------------------------------------------------------------------- text files


def _byte_position(data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    return f"byte 0x{data[offset]:02x} at offset {offset}, line {line}"


def read_text(
    dataset: str, path: str, display: str, *, kind: Literal["csv", "json"]
) -> tuple[str, BadInput | None]:
    """Decode a CSV or JSON(L) file: ``(text, note)`` where ``note`` is a warning or None.

    UTF-8 with or without a BOM always; a UTF-16 file with its BOM; a CSV that is not UTF-8 is
    read as cp1252 (what Excel writes on Windows) with a note. Anything else is a fatal
    ``BadInputError`` naming the file and the first byte that does not decode.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise fatal(dataset, display, f"cannot read ({exc.strerror or exc})") from exc
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), None
        except UnicodeDecodeError as exc:
            raise fatal(dataset, display, f"bad UTF-16 ({_byte_position(data, exc.start)})")
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        where = _byte_position(data, exc.start)
    if kind == "json":
        raise fatal(dataset, display, f"not UTF-8 ({where}); JSON must be UTF-8: save it as UTF-8")
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise fatal(
            dataset,
            display,
            f"neither UTF-8 ({where}) nor cp1252 ({_byte_position(data, exc.start)}): "
            "save it as UTF-8",
        ) from None
    note = BadInput(
        display,
        f"not UTF-8 ({where}); read as cp1252 (as Excel saves CSV on Windows). Check its "
        "non-ASCII values; save it as UTF-8 to silence this",
    )
    return text, note


# ----------------------------------------------------------------------------- file names


class SuffixCaseResolver:
    """Finds ``a.JPG`` (or ``a.Jpg``) when ``a.jpg`` is asked for: the stem must match exactly,
    the suffix without regard to case. Folder listings are cached for one conversion."""

    def __init__(self) -> None:
        self._listings: dict[str, list[str]] = {}

    def _list(self, folder: str) -> list[str]:
        if folder not in self._listings:
            try:
                self._listings[folder] = sorted(os.listdir(folder or "."))
            except OSError:
                self._listings[folder] = []
        return self._listings[folder]

    def resolve(self, path: str) -> tuple[str | None, list[str]]:
        """``(path found, [])``, ``(None, [])`` when none exists, or ``(None, candidates)`` when
        several files differ from ``path`` only in the suffix's case."""
        if os.path.isfile(path):
            return path, []
        folder, name = os.path.split(path)
        stem, suffix = os.path.splitext(name)
        hits = [
            os.path.join(folder, e)
            for e in self._list(folder)
            if os.path.splitext(e)[0] == stem
            and os.path.splitext(e)[1].lower() == suffix.lower()
            and os.path.isfile(os.path.join(folder, e))
        ]
        if len(hits) == 1:
            return hits[0], []
        return None, hits


def has_image_suffix(name: str) -> bool:
    """True for a file name whose suffix (any case) is in ``IMAGE_SUFFIXES``."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# ----------------------------------------------------------------------------- masks -> boxes


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


# ----------------------------------------------------------------------------- splits


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(train, val, test)`` fractions: three numbers >= 0 that sum to 1."""
    if len(fractions) != 3:
        raise ValueError(f"split fractions must be (train, val, test), got {list(fractions)}")
    f = tuple(float(x) for x in fractions)
    if any(x < 0 for x in f) or not math.isclose(sum(f), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    return f  # type: ignore[return-value]


def split_groups(groups: Iterable[str], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Assign each distinct group (e.g. a HAM10000 ``lesion_id``) to train/val/test.

    The sorted distinct groups are shuffled with ``numpy.random.default_rng(seed)``; the first
    ``floor(n*f_test + 0.5)`` go to test, the next ``floor(n*f_val + 0.5)`` to val, the rest to
    train. Example: 20 groups, fractions (0.7, 0.1, 0.2) -> 4 test, 2 val, 14 train.
    """
    _, f_val, f_test = check_fractions(fractions)
    unique = sorted(set(groups))
    n = len(unique)
    n_test = math.floor(n * f_test + 0.5)
    n_val = min(math.floor(n * f_val + 0.5), n - n_test)
    order = np.random.default_rng(seed).permutation(n)
    assignment: dict[str, str] = {}
    for rank, idx in enumerate(order):
        split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        assignment[unique[int(idx)]] = split
    return assignment


# ----------------------------------------------------------------------------- files


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_sources(src: str, paths: Iterable[str]) -> dict[str, str]:
    """``{path relative to src: sha256}`` for every existing file in ``paths``, sorted by name."""
    out: dict[str, str] = {}
    for path in paths:
        if os.path.isfile(path):
            out[os.path.relpath(path, src)] = sha256_file(path)
    return dict(sorted(out.items()))


def relpath_from(out_dir: str, path: str) -> str:
    """Path of ``path`` relative to the output folder (records point at source images)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))


def json_text(obj: Any) -> str:
    """Deterministic pretty JSON text (sorted keys are NOT used: field order is meaningful)."""
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- manifest + output


def build_manifest(
    *,
    dataset: str,
    converter: str,
    src: str,
    out_dir: str,
    records: Sequence[GroundingRecord],
    options: dict[str, Any],
    mask_rule: str | None,
    multi_component_ids: Iterable[str],
    source_hashes: dict[str, str],
    skipped: Sequence[BadInput],
    warnings: Sequence[BadInput] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest written next to the split files.

    Keys: dataset, converter, source_dir (relative to the output folder), image_paths (a note on
    how record image paths resolve), options, mask_rule, counts (per split), n_records,
    n_multi_component_masks (total and per split; 8-connected components), skipped (file +
    reason), warnings (file + reason), source_sha256.
    """
    multi = set(multi_component_ids)
    counts = {s: sum(r.split == s for r in records) for s in SPLITS}
    multi_by_split = {s: sum(r.split == s and r.id in multi for r in records) for s in SPLITS}
    manifest: dict[str, Any] = {
        "dataset": dataset,
        "converter": converter,
        "source_dir": relpath_from(out_dir, src),
        "image_paths": "relative to this folder: records point at the source images, none copied",
        "options": options,
        "mask_rule": mask_rule,
        "counts": counts,
        "n_records": len(records),
        "n_multi_component_masks": sum(multi_by_split.values()),
        "multi_component_masks_by_split": multi_by_split,
        "skipped": [b.to_dict() for b in skipped],
        "warnings": [b.to_dict() for b in warnings],
    }
    if extra:
        manifest.update(extra)
    manifest["source_sha256"] = source_hashes
    return manifest


def write_outputs(
    out_dir: str, records: Sequence[GroundingRecord], manifest: dict[str, Any]
) -> None:
    """Write ``<out>/{train,val,test}.jsonl`` (always all three, possibly empty) and
    ``<out>/manifest.json``, all-or-nothing."""
    files = {
        os.path.join(out_dir, f"{split}.jsonl"): records_to_jsonl(
            [r for r in records if r.split == split]
        )
        for split in SPLITS
    }
    files[os.path.join(out_dir, "manifest.json")] = json_text(manifest)
    atomic_write_files(files)


# ----------------------------------------------------------------------------- CLI


def base_parser(description: str, *, with_mask_options: bool = True) -> argparse.ArgumentParser:
    """Arguments every converter takes: --src, --out, --skip-bad (+ the mask options)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--src", required=True, help="the raw dataset folder")
    parser.add_argument(
        "--out", required=True, help="output folder for <split>.jsonl + manifest.json"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad samples out (listed in the manifest) instead of failing",
    )
    if with_mask_options:
        parser.add_argument(
            "--rule", default="union", choices=list(MASK_RULES), help="mask -> box rule"
        )
        parser.add_argument(
            "--mask-threshold",
            type=int,
            default=DEFAULT_MASK_THRESHOLD,
            help="mask foreground is value > threshold (default 127; 0 for 0/1 masks)",
        )
        parser.add_argument(
            "--max-mask-fraction",
            type=float,
            default=DEFAULT_MAX_MASK_FRACTION,
            help="a mask whose foreground covers more than this share of the image is bad "
            f"input (default {DEFAULT_MAX_MASK_FRACTION}; see --allow-full-frame-mask)",
        )
        parser.add_argument(
            "--allow-full-frame-mask",
            action="store_true",
            help="accept masks covering (almost) the whole frame or surrounding the background "
            "(normally an inverted mask)",
        )
    return parser


def mask_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The mask options of ``base_parser`` as ``convert`` keywords."""
    return {
        "rule": args.rule,
        "mask_threshold": args.mask_threshold,
        "max_mask_fraction": args.max_mask_fraction,
        "allow_full_frame_mask": args.allow_full_frame_mask,
    }


def run_cli(fn: Callable[[], dict[str, Any]]) -> int:
    """Run a converter; print its manifest counts (and warnings, to stderr), or the bad-input
    summary and return 2."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConverterWarning)
        try:
            manifest = fn()
        except BadInputError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        finally:
            for w in caught:
                if issubclass(w.category, ConverterWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(
        f"{manifest['dataset']}: wrote {manifest['n_records']} records {manifest['counts']}; "
        f"{manifest['n_multi_component_masks']} multi-component masks; "
        f"{len(manifest['skipped'])} skipped; {len(manifest['warnings'])} warning(s)"
    )
    return 0
