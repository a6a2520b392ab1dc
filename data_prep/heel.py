"""HEEL (lateral foot X-ray) -> unified grounding JSONL (docs/method.md §7).

HEEL has no public box release, so this converter reads a generic annotation file under ``src``:

JSONL (one object per line)::

    {"image": "images/heel_00001.png", "bbox": [x1, y1, x2, y2]}
    {"image": "dicom/patient7.dcm", "mask": "masks/patient7.png"}      # box from a mask

CSV (header row; ``bbox`` may also be given as one cell ``"[x1, y1, x2, y2]"``)::

    image,x1,y1,x2,y2            or            image,mask

Optional fields/columns on every row: ``split`` (train/val/test; if any row has one, every row
must), ``query`` (default ``DEFAULT_QUERY``), ``id`` (default: the image path relative to
``src`` without its suffix, plus ``#k`` for the k-th extra box on the same image). Paths are
relative to ``src`` (absolute paths are accepted). Images may be JPEG/PNG or DICOM.

A path whose file exists only with its suffix in another case (``a.png`` named, ``a.PNG`` on
disk) resolves to that file; several such files are reported as ambiguous. The file's encoding:
JSONL is UTF-8 (a BOM is accepted); CSV is UTF-8 (BOM accepted) or, as Excel saves it on
Windows, cp1252 (read with a warning). A file without a single annotation row is an error.

Boxes are pixel xyxy in the continuous convention (``data_prep.masks``); a tool that writes
inclusive last-pixel indices needs ``box_convention="inclusive"`` (adds 1 to x2 and y2). Boxes
reaching outside the image are bad input unless ``clip_boxes`` is set. Masks go through the same
rule/threshold and full-frame check as the other
datasets (``data_prep.masks``).

Without a ``split`` column the split is by image (every box of one image in the same split) with
a seed; the paper gives no fractions: ASSUMED (train, val, test) = (0.7, 0.1, 0.2).

CLI: ``python -m data_prep.heel --src RAW --out OUT [--annotations FILE] [--skip-bad] ...``
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from data_prep.bad_input import (
    BadInput,
    BadInputError,
    check_bad_inputs,
    check_has_records,
    check_out_dir,
    emit_warnings,
    fatal,
)
from data_prep.common import (
    SuffixCaseResolver,
    base_parser,
    build_manifest,
    check_fractions,
    hash_sources,
    mask_kwargs,
    read_text,
    relpath_from,
    run_cli,
    split_groups,
    write_outputs,
)
from data_prep.masks import (
    DEFAULT_MASK_THRESHOLD,
    DEFAULT_MAX_MASK_FRACTION,
    ImageInfo,
    MaskRule,
    check_mask_rule,
    check_max_mask_fraction,
    read_image_and_mask,
    read_image_info,
)
from medloc.data.records import SPLITS, GroundingRecord
from medloc.jsonl import JsonlError, read_jsonl

DATASET = "heel"
# ASSUMED: the paper does not publish HEEL's query wording.
DEFAULT_QUERY = "the abnormal region of the heel"
DEFAULT_ANNOTATION_NAMES = ("annotations.jsonl", "annotations.csv")
# ASSUMED (not in the paper): 70/10/20 split by image when the file has no split column.
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)

BoxConvention = Literal["continuous", "inclusive"]


@dataclass(frozen=True)
class _Accepted:
    """A row that passed every check, waiting for its split."""

    image_path: str
    image_key: str  # the image as the annotation file names it (normalised): the split group
    rec_id: str
    split: str | None
    box: list[float]
    width: int
    height: int
    query: str
    provenance: dict[str, Any]
    n_components: int


def _find_annotations(src: str, annotations: str | None) -> str:
    if annotations is not None:
        path = annotations if os.path.isabs(annotations) else os.path.join(src, annotations)
        if not os.path.isfile(path):
            raise BadInputError(
                DATASET, [BadInput(path, "annotation file does not exist")], fatal=True
            )
        return path
    present = [
        os.path.join(src, n)
        for n in DEFAULT_ANNOTATION_NAMES
        if os.path.isfile(os.path.join(src, n))
    ]
    if len(present) != 1:
        reason = (
            "both exist; pass --annotations" if present else "neither exists; pass --annotations"
        )
        raise BadInputError(
            DATASET,
            [BadInput(os.path.join(src, " | ".join(DEFAULT_ANNOTATION_NAMES)), reason)],
            fatal=True,
        )
    return present[0]


def _read_rows(path: str, display: str) -> tuple[list[tuple[str, dict[str, Any]]], BadInput | None]:
    """Rows of the annotation file as ``(where, row)`` with ``where = file:line``, and a warning
    (a CSV read as cp1252) or None. A file without a single row is a fatal error."""
    is_csv = path.lower().endswith(".csv")
    text, note = read_text(DATASET, path, display, kind="csv" if is_csv else "json")
    notes = [note] if note else []
    rows: list[tuple[str, dict[str, Any]]] = []
    if is_csv:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if not columns:
            raise fatal(DATASET, display, "the annotation CSV is empty (no header, no rows)", notes)
        if "image" not in columns:
            raise BadInputError(
                DATASET,
                [BadInput(display, f"no 'image' column; found {columns}")],
                fatal=True,
                notes=notes,
            )
        for row in reader:
            clean = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
            clean = {k: v for k, v in clean.items() if v not in (None, "")}
            if not clean:
                continue  # an empty line or a row of empty cells (Excel leaves these)
            if all(k in clean for k in ("x1", "y1", "x2", "y2")):
                clean["bbox"] = [clean.pop(k) for k in ("x1", "y1", "x2", "y2")]
            elif isinstance(clean.get("bbox"), str):
                try:
                    clean["bbox"] = json.loads(clean["bbox"])
                except json.JSONDecodeError:
                    pass  # reported as a malformed bbox below
            rows.append((f"{display}:{reader.line_num}", clean))
        if not rows:
            raise fatal(DATASET, display, "the annotation CSV has a header but no data row", notes)
        return rows, note
    for lineno, obj in read_jsonl(display, text=text, bad="keep"):
        if isinstance(obj, JsonlError):
            obj = {"__error__": obj.problem}
        elif not isinstance(obj, dict):
            obj = {"__error__": "expected a JSON object"}
        rows.append((f"{display}:{lineno}", obj))
    if not rows:
        raise fatal(DATASET, display, "the annotation file is empty (no JSON line)")
    return rows, note


def _missing(display: str, what: str, where: str, candidates: list[str], src: str) -> BadInput:
    """The bad input for an image/mask the annotation names but that cannot be found."""
    if candidates:
        names = ", ".join(os.path.relpath(c, src) for c in candidates)
        return BadInput(
            display,
            f"{what} is ambiguous (named on {where}): several files differ only in "
            f"the suffix's case: {names}",
        )
    return BadInput(display, f"{what} does not exist (named on {where})")


def _parse_bbox(value: Any, convention: BoxConvention) -> list[float] | str:
    """``[x1, y1, x2, y2]`` as floats, or a string saying what is wrong."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return f"bbox must be [x1, y1, x2, y2], got {value!r}"
    try:
        if any(isinstance(v, bool) for v in value):
            raise TypeError("bool is not a coordinate")
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        return f"bbox must hold 4 numbers, got {value!r}"
    if not all(math.isfinite(v) for v in box):
        return f"bbox must hold finite numbers, got {value!r}"
    if convention == "inclusive":
        box[2] += 1.0
        box[3] += 1.0
    if not (box[0] < box[2] and box[1] < box[3]):
        return f"bbox needs x1 < x2 and y1 < y2, got {value!r}"
    return box


def convert(
    src: str,
    out: str,
    *,
    annotations: str | None = None,
    skip_bad: bool = False,
    rule: MaskRule = "union",
    mask_threshold: int = DEFAULT_MASK_THRESHOLD,
    max_mask_fraction: float = DEFAULT_MAX_MASK_FRACTION,
    allow_full_frame_mask: bool = False,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    query: str = DEFAULT_QUERY,
    box_convention: BoxConvention = "continuous",
    clip_boxes: bool = False,
) -> dict[str, Any]:
    """Convert a HEEL-style folder; returns the manifest (also written to ``<out>/manifest.json``).

    Raises ``BadInputError`` listing every offender (and writes nothing) unless ``skip_bad``;
    warnings (a cp1252 CSV) go to the manifest and a ``ConverterWarning``.
    """
    rule = check_mask_rule(rule)
    fractions = check_fractions(fractions)
    max_mask_fraction = check_max_mask_fraction(max_mask_fraction)
    if box_convention not in get_args(BoxConvention):
        raise ValueError(
            f"box_convention={box_convention!r}; expected one of {list(get_args(BoxConvention))}"
        )
    check_out_dir(DATASET, out)
    if not os.path.isdir(src):
        raise BadInputError(DATASET, [BadInput(src, "source folder does not exist")], fatal=True)
    ann_path = _find_annotations(src, annotations)
    ann_display = os.path.relpath(ann_path, src)
    rows, note = _read_rows(ann_path, ann_display)
    notes = [note] if note else []
    resolver = SuffixCaseResolver()

    # Split groups are all images the file names, so skipping a bad row never moves another image.
    named_images = sorted(
        {
            os.path.normpath(row["image"])
            for _, row in rows
            if isinstance(row.get("image"), str) and row["image"].strip()
        }
    )
    n_with_split = sum("split" in row for _, row in rows)
    split_mode = "from_file" if n_with_split else "by_image"
    bad: list[BadInput] = []
    infos: dict[tuple[str, str | None], tuple[ImageInfo | None, list[BadInput]]] = {}
    accepted: list[_Accepted] = []
    per_image_count: dict[str, int] = {}
    explicit_ids: dict[str, str] = {}
    used_files = [ann_path]
    for where, row in rows:
        if "__error__" in row:
            bad.append(BadInput(where, row["__error__"]))
            continue
        image_rel = row.get("image")
        if not isinstance(image_rel, str) or not image_rel.strip():
            bad.append(BadInput(where, "annotation row without an image"))
            continue
        image_path = image_rel if os.path.isabs(image_rel) else os.path.join(src, image_rel)
        image_display = os.path.relpath(image_path, src)
        split = row.get("split")
        if split_mode == "from_file" and split is None:
            bad.append(BadInput(where, "row has no split but other rows do"))
            continue
        if split is not None and split not in SPLITS:
            bad.append(BadInput(where, f"split {split!r} is not one of {list(SPLITS)}"))
            continue
        has_box, has_mask = "bbox" in row, "mask" in row
        if has_box == has_mask:
            found_cols = sorted(k for k in row if not k.startswith("__"))
            bad.append(BadInput(where, (
                "row needs exactly one of a box or a mask: columns x1,y1,x2,y2, or one 'bbox' "
                "cell \"[x1, y1, x2, y2]\" (JSONL: \"bbox\": [x1, y1, x2, y2]), or a 'mask' column "
                f"(a mask image path); this row has {found_cols}")))
            continue
        found, candidates = resolver.resolve(image_path)
        if found is None:
            bad.append(_missing(image_display, "image", where, candidates, src))
            continue
        image_path, image_display = found, os.path.relpath(found, src)

        mask_path: str | None = None
        if has_mask:
            mask_rel = str(row["mask"])
            mask_path = mask_rel if os.path.isabs(mask_rel) else os.path.join(src, mask_rel)
            found, candidates = resolver.resolve(mask_path)
            if found is None and candidates:
                bad.append(
                    _missing(os.path.relpath(mask_path, src), "mask", where, candidates, src)
                )
                continue
            mask_path = found or mask_path  # a missing mask is reported by read_image_and_mask
        key = (image_path, mask_path)
        seen_before = key in infos
        if not seen_before:
            if mask_path is None:
                infos[key] = read_image_info(image_path, image_display)
            else:
                infos[key] = read_image_and_mask(
                    image_path,
                    mask_path,
                    image_display=image_display,
                    mask_display=os.path.relpath(mask_path, src),
                    rule=rule,
                    threshold=mask_threshold,
                    max_mask_fraction=max_mask_fraction,
                    allow_full_frame_mask=allow_full_frame_mask,
                )
        info, pair_bad = infos[key]
        if pair_bad or info is None:
            if seen_before:  # the file problems are already listed once
                bad.append(BadInput(where, f"uses the bad image/mask {image_display} listed above"))
            else:
                bad += pair_bad
            continue

        if has_box:
            parsed = _parse_bbox(row["bbox"], box_convention)
            if isinstance(parsed, str):
                bad.append(BadInput(where, parsed))
                continue
            box = parsed
            inside = box[0] >= 0 and box[1] >= 0 and box[2] <= info.width and box[3] <= info.height
            if not inside and not clip_boxes:
                bad.append(
                    BadInput(
                        where,
                        f"bbox {row['bbox']!r} reaches outside the "
                        f"{info.width}x{info.height} image {image_display} "
                        "(pass --clip-boxes to clip)",
                    )
                )
                continue
            box = [
                max(0.0, box[0]),
                max(0.0, box[1]),
                min(float(info.width), box[2]),
                min(float(info.height), box[3]),
            ]
            if not (box[0] < box[2] and box[1] < box[3]):
                bad.append(BadInput(where, f"bbox {row['bbox']!r} is empty inside the image"))
                continue
            n_components = 0
        else:
            box, n_components = info.box, info.n_components  # type: ignore[assignment]

        if "id" in row:
            rec_id = str(row["id"])
            if rec_id in explicit_ids:
                bad.append(
                    BadInput(where, f"duplicate id {rec_id!r} (first on {explicit_ids[rec_id]})")
                )
                continue
            explicit_ids[rec_id] = where
        else:
            base = os.path.splitext(image_display)[0].replace(os.sep, "/")
            k = per_image_count.get(base, 0)
            per_image_count[base] = k + 1
            rec_id = base if k == 0 else f"{base}#{k}"
        provenance: dict[str, Any] = {"source": "HEEL", "annotation": where}
        if mask_path is not None:
            provenance.update(
                mask=relpath_from(out, mask_path),
                n_components=n_components,
                **info.mask_provenance(),
            )
            used_files.append(mask_path)
        used_files.append(image_path)
        row_query = row.get("query")
        accepted.append(
            _Accepted(
                image_path=image_path,
                image_key=os.path.normpath(image_rel),
                rec_id=rec_id,
                split=split,
                box=box,
                width=info.width,
                height=info.height,
                query=row_query.strip()
                if isinstance(row_query, str) and row_query.strip()
                else query,
                provenance=provenance,
                n_components=n_components,
            )
        )

    check_bad_inputs(DATASET, bad, skip_bad=skip_bad, notes=notes, total=len(rows))
    check_has_records(DATASET, accepted, ann_display, bad, "no annotation row is usable")
    if split_mode == "by_image":
        assignment = split_groups(named_images, fractions, seed)
    records: list[GroundingRecord] = []
    multi: list[str] = []
    for a in accepted:
        split = a.split if a.split is not None else assignment[a.image_key]
        records.append(
            GroundingRecord(
                id=a.rec_id,
                image=relpath_from(out, a.image_path),
                height=a.height,
                width=a.width,
                query=a.query,
                box=a.box,
                dataset=DATASET,
                split=split,
                provenance=a.provenance,
            )
        )
        if a.n_components > 1:
            multi.append(a.rec_id)
    records.sort(key=lambda r: (SPLITS.index(r.split), r.id))
    manifest = build_manifest(
        dataset=DATASET,
        converter="data_prep.heel",
        src=src,
        out_dir=out,
        records=records,
        options={
            "annotations": ann_display,
            "split_mode": split_mode,
            "seed": seed,
            "fractions": list(fractions),
            "box_convention": box_convention,
            "clip_boxes": clip_boxes,
            "mask_threshold": mask_threshold,
            "max_mask_fraction": max_mask_fraction,
            "allow_full_frame_mask": allow_full_frame_mask,
            "default_query": query,
        },
        mask_rule=rule,
        multi_component_ids=multi,
        source_hashes=hash_sources(src, sorted(set(used_files))),
        skipped=bad,
        warnings=notes,
    )
    write_outputs(out, records, manifest)
    emit_warnings(DATASET, notes)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("HEEL-style {image, bbox|mask} annotations -> unified grounding JSONL.",
                         layout=__doc__.split("\nCLI:")[0])
    parser.add_argument(
        "--annotations",
        default=None,
        help="annotation JSONL/CSV (default: annotations.jsonl or .csv in --src)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the by-image split")
    parser.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=list(DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions by image when the file has no split (ASSUMED 0.7 0.1 0.2)",
    )
    parser.add_argument("--query", default=DEFAULT_QUERY, help="query for rows without one")
    parser.add_argument(
        "--box-convention",
        default="continuous",
        choices=list(get_args(BoxConvention)),
        help="'inclusive' if x2/y2 are the last pixel's index (adds 1)",
    )
    parser.add_argument("--clip-boxes", action="store_true", help="clip boxes to the image")
    args = parser.parse_args(argv)
    return run_cli(
        lambda: convert(
            args.src,
            args.out,
            annotations=args.annotations,
            skip_bad=args.skip_bad,
            **mask_kwargs(args),
            seed=args.seed,
            fractions=args.fractions,
            query=args.query,
            box_convention=args.box_convention,
            clip_boxes=args.clip_boxes,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
