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
  at a corner belong to one nodule.
Masks are binarised with ``value > threshold`` (threshold 127 by default: TN3K masks are lossy
JPEG, so 0/255 comes back as values near 0 and near 255).

Bad input
---------
Converters check every sample, collect every offender as ``BadInput(file, reason)`` and then
either raise one ``BadInputError`` listing them all (nothing is written) or, with ``--skip-bad``,
leave those samples out and list them under ``"skipped"`` in the manifest. Outputs are written
all-or-nothing: every file goes to a temp file first, and only then are they renamed into place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image
from scipy import ndimage

from medloc.data.dataset import ImageLoadError, load_image
from medloc.data.records import SPLITS, GroundingRecord, records_to_jsonl

MaskRule = Literal["union", "largest"]
MASK_RULES: tuple[str, ...] = get_args(MaskRule)

# 0/255 masks (and their JPEG-compressed versions) binarise at > 127 (PAPER.md §7, TN3K).
DEFAULT_MASK_THRESHOLD = 127

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
    """Raised by a converter when input is bad; ``offenders`` lists every problem found."""

    def __init__(self, dataset: str, offenders: Sequence[BadInput], *, fatal: bool = False) -> None:
        self.dataset = dataset
        self.offenders = list(offenders)
        self.fatal = fatal
        super().__init__(format_bad_inputs(dataset, self.offenders, fatal=fatal))


def format_bad_inputs(dataset: str, offenders: Sequence[BadInput], *, fatal: bool = False) -> str:
    """The one summary a user reads: every offender with its file and reason."""
    lines = [f"{dataset}: {len(offenders)} bad input(s); nothing was written:"]
    lines += [f"  - {b.file}: {b.reason}" for b in offenders]
    if fatal:
        lines.append("These problems make the conversion impossible; --skip-bad cannot skip them.")
    else:
        lines.append(
            "Fix them, or pass --skip-bad to leave these samples out (listed in the manifest)."
        )
    return "\n".join(lines)


def check_bad_inputs(dataset: str, bad: Sequence[BadInput], *, skip_bad: bool) -> None:
    """Raise ``BadInputError`` if there is bad input and skipping was not asked for."""
    if bad and not skip_bad:
        raise BadInputError(dataset, bad)


# ----------------------------------------------------------------------------- masks -> boxes


class EmptyMaskError(ValueError):
    """A mask has no foreground pixel after binarisation."""


def check_mask_rule(rule: str) -> MaskRule:
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule {rule!r} is not one of {list(MASK_RULES)}")
    return rule  # type: ignore[return-value]


def binarize_mask(mask: np.ndarray, threshold: int = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Foreground = ``value > threshold``. Colour masks use the max over colour channels.

    ``mask``: ``[H, W]`` or ``[H, W, C]`` (an alpha channel, C = 2 or 4, is ignored).
    Returns a boolean ``[H, W]`` array.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        colour = mask[:, :, :3] if mask.shape[2] >= 3 else mask[:, :, :1]
        mask = colour.max(axis=2)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W] or [H, W, C], got shape {mask.shape}")
    return mask > threshold


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


def load_mask(path: str, threshold: int = DEFAULT_MASK_THRESHOLD) -> np.ndarray:
    """Read a mask image file into a boolean ``[H, W]`` array (``value > threshold``)."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except Exception as exc:
        raise ImageLoadError(path, f"{type(exc).__name__}: {exc}") from exc
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return binarize_mask(arr, threshold)


@dataclass(frozen=True)
class ImageInfo:
    """What a converter needs to know about one source image (and its mask, when it has one)."""

    width: int
    height: int
    box: list[float] | None = None
    n_components: int = 0


def read_image_info(image_path: str, display: str) -> tuple[ImageInfo | None, list[BadInput]]:
    """Decode an image fully (so a truncated file is caught) and return its size.

    ``display`` is the name used in error messages (usually the path relative to the source).
    """
    try:
        image = load_image(image_path)
    except ImageLoadError as exc:
        return None, [BadInput(display, f"unreadable image ({exc.reason})")]
    return ImageInfo(width=image.size[0], height=image.size[1]), []


def read_image_and_mask(
    image_path: str,
    mask_path: str | None,
    *,
    image_display: str,
    mask_display: str,
    rule: MaskRule,
    threshold: int,
) -> tuple[ImageInfo | None, list[BadInput]]:
    """Check an image/mask pair and compute the box; every problem found is returned.

    Problems: missing or unreadable image, missing or unreadable mask, mask size different from
    the image size, empty mask.
    """
    info, bad = read_image_info(image_path, image_display)
    if mask_path is None or not os.path.isfile(mask_path):
        bad.append(BadInput(mask_display, "mask file does not exist"))
        return None, bad
    try:
        mask = load_mask(mask_path, threshold)
    except ImageLoadError as exc:
        bad.append(BadInput(mask_display, f"unreadable mask ({exc.reason})"))
        return None, bad
    if info is None:
        return None, bad
    h, w = mask.shape
    if (w, h) != (info.width, info.height):
        bad.append(
            BadInput(
                mask_display,
                f"mask is {w}x{h} (WxH) but its image {image_display} is "
                f"{info.width}x{info.height}",
            )
        )
        return None, bad
    try:
        result = mask_to_box(mask, rule)
    except EmptyMaskError:
        bad.append(
            BadInput(
                mask_display,
                f"empty mask: no pixel > {threshold} (a 0/1 mask needs --mask-threshold 0)",
            )
        )
        return None, bad
    return ImageInfo(info.width, info.height, result.box, result.n_components), bad


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


def write_files_atomic(files: dict[str, str]) -> None:
    """Write several text files all-or-nothing.

    Every file is first written in full to a temp file beside its target; only when all temp
    files exist are they renamed into place (``os.replace`` each). If anything fails before the
    renames, the temp files are removed and no target is touched.
    """
    temps: list[tuple[str, str]] = []
    try:
        for path, text in files.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder
            )
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    write_files_atomic({path: json_text(obj)})


def write_jsonl_atomic(path: str, rows: Iterable[Any]) -> None:
    write_files_atomic({path: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)})


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
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest written next to the split files.

    Keys: dataset, converter, source_dir (relative to the output folder), image_paths (a note on
    how record image paths resolve), options, mask_rule, counts (per split), n_records,
    n_multi_component_masks (total and per split), skipped (file + reason), source_sha256.
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
    write_files_atomic(files)


# ----------------------------------------------------------------------------- CLI


def base_parser(description: str, *, with_mask_options: bool = True) -> argparse.ArgumentParser:
    """Arguments every converter takes: --src, --out, --skip-bad (+ mask rule/threshold)."""
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
    return parser


def run_cli(fn: Callable[[], dict[str, Any]]) -> int:
    """Run a converter; print its manifest counts, or the bad-input summary and return 2."""
    try:
        manifest = fn()
    except BadInputError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(
        f"{manifest['dataset']}: wrote {manifest['n_records']} records {manifest['counts']}; "
        f"{manifest['n_multi_component_masks']} multi-component masks; "
        f"{len(manifest['skipped'])} skipped"
    )
    return 0
