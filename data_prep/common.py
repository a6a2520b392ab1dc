"""Shared pieces of the dataset converters (docs/method.md §7): reading source text files, matching file
names, deterministic splits, source hashing, manifests, all-or-nothing output writing and the
command line every converter shares. Masks -> boxes: ``data_prep.masks``; bad-input reporting:
``data_prep.bad_input``.

File names: an image or mask suffix is matched without regard to case (``ISIC_1.JPG``,
``0001.Png``), the stem exactly; two files that differ only in the suffix's case are ambiguous
and reported.

Text files: CSV files are read as UTF-8 (a BOM is accepted); a CSV that is not UTF-8 (Excel
saves cp1252 on Windows) is read as cp1252 with a warning, and one that is neither is a fatal
error naming the byte. JSON/JSONL files are UTF-8 with or without a BOM (RFC 8259); anything else

Outputs are written all-or-nothing (``write_outputs``): every file goes to a temp file first, and
only then are they renamed into place.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np

from data_prep.bad_input import BadInput, BadInputError, ConverterWarning, fatal
from data_prep.masks import DEFAULT_MASK_THRESHOLD, DEFAULT_MAX_MASK_FRACTION, MASK_RULES
from medloc.atomic import atomic_write_files
from medloc.data.records import SPLITS, GroundingRecord, records_to_jsonl
from medloc.logging import console

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")


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


def base_parser(description: str, *, with_mask_options: bool = True,
                layout: str | None = None) -> argparse.ArgumentParser:
    """Arguments every converter takes: --src, --out, --skip-bad (+ the mask options).

    ``layout``: the on-disk layout the converter reads (its module docstring), shown by ``--help``
    after the options."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=("What --src must hold:\n\n" + layout.strip()) if layout else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
            console(str(exc), err=True)
            return 2
        finally:
            for w in caught:
                if issubclass(w.category, ConverterWarning):
                    console(f"warning: {w.message}", err=True)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    console(
        f"{manifest['dataset']}: wrote {manifest['n_records']} records {manifest['counts']}; "
        f"{manifest['n_multi_component_masks']} multi-component masks; "
        f"{len(manifest['skipped'])} skipped; {len(manifest['warnings'])} warning(s)"
    )
    return 0
