"""HAM10000 (dermoscopy) -> unified grounding JSONL (docs/method.md §7).

Reads the real on-disk layout (also what ``data_prep.phantoms`` writes)::

    <src>/HAM10000_metadata.csv          lesion_id,image_id,dx,dx_type,age,sex,localization[,...]
    <src>/**/ISIC_XXXXXXX.jpg             the images (600x450 in the real set), any sub-folder
    <src>/**/ISIC_XXXXXXX_segmentation.png  lesion masks, 0/255 (Tschandl et al. 2020)

Images and masks are found by file name anywhere under ``src`` (the real release spreads them
over ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/`` and a segmentation folder); the
suffix may be in any case (``ISIC_0024306.JPG``, ``ISIC_0024306_segmentation.Png``), and two
files with the same name in different case or folders are reported, never picked from. Only
images named in the metadata CSV are used. The CSV may be UTF-8 (with or without a BOM) or, as
Excel saves it on Windows, cp1252 (read with a warning); a CSV without data rows is an error.
Masks are read as ``data_prep.masks`` describes (palette colours, alpha, full-frame check).

Split: by ``lesion_id`` (several images per lesion; no lesion in two splits) with
``data_prep.common.split_groups`` over ALL lesion ids of the CSV, so skipping a bad image never
moves another lesion to a different split. The fractions are not given by the paper: ASSUMED
(train, val, test) = (0.7, 0.1, 0.2), a keyword/CLI option.

Output: ``<out>/{train,val,test}.jsonl`` + ``<out>/manifest.json``. Record image paths are
relative to ``<out>`` and point at the source images (nothing is copied).

CLI: ``python -m data_prep.ham10000 --src RAW --out OUT [--skip-bad] [--rule union|largest]
[--seed 0] [--fractions 0.7 0.1 0.2] [--mask-threshold 127] [--max-mask-fraction 0.95]
[--allow-full-frame-mask]``
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from typing import Any

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
    MaskRule,
    check_mask_rule,
    check_max_mask_fraction,
    read_image_and_mask,
)
from medloc.data.records import GroundingRecord

DATASET = "ham10000"
QUERY = "the skin lesion"
METADATA_NAME = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id")
# Metadata columns copied into each record's provenance when present.
PROVENANCE_COLUMNS = ("lesion_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
# ASSUMED (not in the paper, docs/method.md §7 only says "split by lesion_id"): 70/10/20 by lesion.
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def _name_key(fname: str) -> str:
    """A file name with its suffix in lower case: ``ISIC_1.JPG`` and ``ISIC_1.jpg`` match."""
    stem, suffix = os.path.splitext(fname)
    return stem + suffix.lower()


def _index_files(src: str, names: set[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Find files whose name is in ``names`` (suffix compared without case) anywhere under ``src``.

    ``names`` are given with lower-case suffixes. Returns ``(name -> path, name -> [paths])``
    where the second holds names found more than once (in several folders or several cases).
    """
    found: dict[str, list[str]] = {}
    for folder, dirs, files in os.walk(src):
        dirs.sort()  # deterministic walk order
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for fname in sorted(files):
            key = _name_key(fname)
            if key in names:
                found.setdefault(key, []).append(os.path.join(folder, fname))
    unique = {k: v[0] for k, v in found.items() if len(v) == 1}
    dupes = {k: v for k, v in found.items() if len(v) > 1}
    return unique, dupes


def _find_metadata(src: str, metadata: str | None) -> str:
    if metadata is not None:
        path = metadata if os.path.isabs(metadata) else os.path.join(src, metadata)
        if not os.path.isfile(path):
            raise BadInputError(
                DATASET, [BadInput(path, "metadata CSV does not exist")], fatal=True
            )
        return path
    direct = os.path.join(src, METADATA_NAME)
    if os.path.isfile(direct):
        return direct
    key = _name_key(METADATA_NAME)
    hits, dupes = _index_files(src, {key})
    if key in dupes:
        raise BadInputError(
            DATASET,
            [BadInput(p, "several metadata CSVs found; pass --metadata") for p in dupes[key]],
            fatal=True,
        )
    if key not in hits:
        raise BadInputError(
            DATASET, [BadInput(direct, f"no {METADATA_NAME} under {src}")], fatal=True
        )
    return hits[key]


def _read_metadata(
    path: str, src: str
) -> tuple[list[tuple[int, dict[str, str]]], list[BadInput], list[BadInput]]:
    """Rows of the metadata CSV as ``(line number, row)``, bad rows, and warnings (encoding).

    Structural problems (undecodable, empty, missing columns, no data row) are fatal."""
    display = os.path.relpath(path, src)
    text, note = read_text(DATASET, path, display, kind="csv")
    notes = [note] if note else []
    if not text.strip():
        raise fatal(DATASET, display, "the metadata CSV is empty (no header, no rows)", notes)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise BadInputError(
            DATASET,
            [BadInput(display, f"missing column(s) {missing}; found {columns}")],
            fatal=True,
            notes=notes,
        )
    rows = [(reader.line_num, dict(row)) for row in reader]
    if not rows:
        raise fatal(DATASET, display, "the metadata CSV has a header but no data row", notes)
    bad: list[BadInput] = []
    good: list[tuple[int, dict[str, str]]] = []
    first_line: dict[str, int] = {}
    for line, row in rows:
        image_id = (row.get("image_id") or "").strip()
        lesion_id = (row.get("lesion_id") or "").strip()
        where = f"{display}:{line}"
        if not image_id:
            bad.append(BadInput(where, "CSV row without an image_id"))
        elif not lesion_id:
            bad.append(BadInput(where, f"CSV row for {image_id} without a lesion_id"))
        elif image_id in first_line:
            bad.append(
                BadInput(
                    where, f"duplicate image_id {image_id} (first on line {first_line[image_id]})"
                )
            )
        else:
            first_line[image_id] = line
            good.append((line, row))
    return good, bad, notes


def convert(
    src: str,
    out: str,
    *,
    skip_bad: bool = False,
    rule: MaskRule = "union",
    mask_threshold: int = DEFAULT_MASK_THRESHOLD,
    max_mask_fraction: float = DEFAULT_MAX_MASK_FRACTION,
    allow_full_frame_mask: bool = False,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    metadata: str | None = None,
) -> dict[str, Any]:
    """Convert a HAM10000 folder; returns the manifest (also written to ``<out>/manifest.json``).

    Raises ``BadInputError`` listing every offender (and writes nothing) unless ``skip_bad``;
    warnings (a cp1252 CSV) go to the manifest and a ``ConverterWarning``.
    """
    rule = check_mask_rule(rule)
    fractions = check_fractions(fractions)
    max_mask_fraction = check_max_mask_fraction(max_mask_fraction)
    check_out_dir(DATASET, out)
    if not os.path.isdir(src):
        raise BadInputError(DATASET, [BadInput(src, "source folder does not exist")], fatal=True)
    meta_path = _find_metadata(src, metadata)
    rows, bad, notes = _read_metadata(meta_path, src)
    meta_display = os.path.relpath(meta_path, src)

    wanted = {f"{r['image_id'].strip()}.jpg" for _, r in rows}
    wanted |= {f"{r['image_id'].strip()}_segmentation.png" for _, r in rows}
    files, dupes = _index_files(src, wanted)
    assignment = split_groups((r["lesion_id"].strip() for _, r in rows), fractions, seed)

    records: list[GroundingRecord] = []
    multi: list[str] = []
    used_files = [meta_path]
    for line, row in rows:
        image_id, lesion_id = row["image_id"].strip(), row["lesion_id"].strip()
        image_name, mask_name = f"{image_id}.jpg", f"{image_id}_segmentation.png"
        row_bad: list[BadInput] = []
        for name in (image_name, mask_name):
            if name in dupes:
                row_bad.append(
                    BadInput(
                        name,
                        "found more than once: "
                        + ", ".join(os.path.relpath(p, src) for p in dupes[name]),
                    )
                )
        if image_name not in files and image_name not in dupes:
            row_bad.append(
                BadInput(
                    f"{meta_display}:{line}",
                    f"CSV row names {image_id} but no {image_name} exists under the source folder",
                )
            )
        if row_bad:
            bad += row_bad
            continue
        image_path = files[image_name]
        mask_path = files.get(mask_name)
        info, pair_bad = read_image_and_mask(
            image_path,
            mask_path,
            image_display=os.path.relpath(image_path, src),
            mask_display=os.path.relpath(mask_path, src) if mask_path else mask_name,
            rule=rule,
            threshold=mask_threshold,
            max_mask_fraction=max_mask_fraction,
            allow_full_frame_mask=allow_full_frame_mask,
        )
        if pair_bad or info is None:
            bad += pair_bad
            continue
        used_files += [image_path, mask_path]  # type: ignore[list-item]
        provenance: dict[str, Any] = {
            k: row[k].strip() for k in PROVENANCE_COLUMNS if k in row and row[k] is not None
        }
        provenance.update(
            source="HAM10000",
            mask=relpath_from(out, mask_path),  # type: ignore[arg-type]
            n_components=info.n_components,
            csv_line=line,
            **info.mask_provenance(),
        )
        records.append(
            GroundingRecord(
                id=image_id,
                image=relpath_from(out, image_path),
                height=info.height,
                width=info.width,
                query=QUERY,
                box=info.box,  # type: ignore[arg-type]
                dataset=DATASET,
                split=assignment[lesion_id],
                provenance=provenance,
            )
        )
        if info.n_components > 1:
            multi.append(image_id)

    check_bad_inputs(DATASET, bad, skip_bad=skip_bad, notes=notes)
    check_has_records(DATASET, records, meta_display, bad, "no CSV row has a usable image")
    records.sort(key=lambda r: r.id)
    manifest = build_manifest(
        dataset=DATASET,
        converter="data_prep.ham10000",
        src=src,
        out_dir=out,
        records=records,
        options={
            "seed": seed,
            "fractions": list(fractions),
            "split_by": "lesion_id",
            "mask_threshold": mask_threshold,
            "max_mask_fraction": max_mask_fraction,
            "allow_full_frame_mask": allow_full_frame_mask,
            "metadata": meta_display,
        },
        mask_rule=rule,
        multi_component_ids=multi,
        source_hashes=hash_sources(src, used_files),
        skipped=bad,
        warnings=notes,
        extra={
            "lesions_per_split": {
                s: len({r.provenance["lesion_id"] for r in records if r.split == s})
                for s in ("train", "val", "test")
            }
        },
    )
    write_outputs(out, records, manifest)
    emit_warnings(DATASET, notes)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("HAM10000 -> unified grounding JSONL (split by lesion_id).",
                         layout=__doc__.split("\nCLI:")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the lesion split")
    parser.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=list(DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions by lesion (ASSUMED 0.7 0.1 0.2)",
    )
    parser.add_argument(
        "--metadata", default=None, help=f"metadata CSV (default: find {METADATA_NAME})"
    )
    args = parser.parse_args(argv)
    return run_cli(
        lambda: convert(
            args.src,
            args.out,
            skip_bad=args.skip_bad,
            **mask_kwargs(args),
            seed=args.seed,
            fractions=args.fractions,
            metadata=args.metadata,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
