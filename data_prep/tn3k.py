"""TN3K (thyroid ultrasound) -> unified grounding JSONL (PAPER.md §7).

Reads the real on-disk layout (also what ``data_prep.phantoms`` writes)::

    <src>/trainval-image/NNNN.jpg      <src>/trainval-mask/NNNN.jpg   (masks are lossy JPEG)
    <src>/test-image/NNNN.jpg          <src>/test-mask/NNNN.jpg
    <src>/tn3k-trainval-fold{0..4}.json   {"train": [i, ...], "val": [j, ...]}

Splits: ``test`` is the official test folder; ``train``/``val`` come from the chosen fold file,
whose integers index the SORTED list of trainval image files (sorted by the integer value of the
file stem when every stem is an integer, as the TN3K reference loader does, else by name).
Trainval images in neither list of the fold are left out and counted in the manifest.

A mask has the image's file name in the matching ``*-mask`` folder (or the same stem with another
image suffix). Masks are binarised with ``> 127`` (JPEG). 11.7% of real test masks hold two or
more nodules: the mask -> box rule (``union`` default, or ``largest``) is an option and the number
of multi-component masks is in the manifest.

CLI: ``python -m data_prep.tn3k --src RAW --out OUT [--fold 0] [--skip-bad] [--rule union|largest]``
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from data_prep.common import (
    DEFAULT_MASK_THRESHOLD,
    IMAGE_SUFFIXES,
    BadInput,
    BadInputError,
    MaskRule,
    base_parser,
    build_manifest,
    check_bad_inputs,
    check_mask_rule,
    hash_sources,
    read_image_and_mask,
    relpath_from,
    run_cli,
    write_outputs,
)
from medloc.data.records import GroundingRecord

DATASET = "tn3k"
QUERY = "the thyroid nodule"
N_FOLDS = 5


def list_images(folder: str) -> list[str]:
    """Image file names in ``folder``, sorted numerically by stem if all stems are integers."""
    names = [
        n
        for n in os.listdir(folder)
        if not n.startswith(".")
        and os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES
        and os.path.isfile(os.path.join(folder, n))
    ]
    stems = [os.path.splitext(n)[0] for n in names]
    if names and all(s.isdigit() for s in stems):
        return sorted(names, key=lambda n: (int(os.path.splitext(n)[0]), n))
    return sorted(names)


def _find_mask(mask_dir: str, image_name: str) -> str | None:
    """The mask of ``image_name``: same file name, else same stem with another image suffix."""
    same = os.path.join(mask_dir, image_name)
    if os.path.isfile(same):
        return same
    stem = os.path.splitext(image_name)[0]
    for suffix in IMAGE_SUFFIXES:
        for candidate in (stem + suffix, stem + suffix.upper()):
            path = os.path.join(mask_dir, candidate)
            if os.path.isfile(path):
                return path
    return None


def read_fold(path: str, n_trainval: int, display: str) -> tuple[list[int], list[int]]:
    """Read ``{"train": [...], "val": [...]}``; every structural problem is fatal."""
    if not os.path.isfile(path):
        raise BadInputError(DATASET, [BadInput(display, "fold file does not exist")], fatal=True)
    try:
        with open(path, encoding="utf-8") as fh:
            fold = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(
            DATASET, [BadInput(display, f"not valid JSON ({exc})")], fatal=True
        ) from exc
    problems: list[BadInput] = []
    if not isinstance(fold, dict) or not {"train", "val"} <= set(fold):
        raise BadInputError(
            DATASET, [BadInput(display, 'expected {"train": [...], "val": [...]}')], fatal=True
        )
    lists: dict[str, list[int]] = {}
    for key in ("train", "val"):
        values = fold[key]
        if not isinstance(values, list) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in values
        ):
            problems.append(BadInput(display, f"{key!r} must be a list of integers"))
            continue
        out_of_range = sorted({v for v in values if not 0 <= v < n_trainval})
        if out_of_range:
            problems.append(
                BadInput(
                    display,
                    f"{key!r} indices {out_of_range[:10]} outside 0..{n_trainval - 1} "
                    f"(there are {n_trainval} trainval images)",
                )
            )
        if len(set(values)) != len(values):
            problems.append(BadInput(display, f"{key!r} has repeated indices"))
        lists[key] = values
    if not problems:
        both = sorted(set(lists["train"]) & set(lists["val"]))
        if both:
            problems.append(BadInput(display, f"indices in both train and val: {both[:10]}"))
    if problems:
        raise BadInputError(DATASET, problems, fatal=True)
    return lists["train"], lists["val"]


def convert(
    src: str,
    out: str,
    *,
    fold: int = 0,
    skip_bad: bool = False,
    rule: MaskRule = "union",
    mask_threshold: int = DEFAULT_MASK_THRESHOLD,
) -> dict[str, Any]:
    """Convert a TN3K folder; returns the manifest (also written to ``<out>/manifest.json``).

    Raises ``BadInputError`` listing every offender (and writes nothing) unless ``skip_bad``.
    """
    rule = check_mask_rule(rule)
    if not 0 <= fold < N_FOLDS:
        raise ValueError(f"fold={fold}; expected 0..{N_FOLDS - 1}")
    structural: list[BadInput] = []
    for part in ("trainval-image", "trainval-mask", "test-image", "test-mask"):
        if not os.path.isdir(os.path.join(src, part)):
            structural.append(BadInput(os.path.join(src, part), "folder does not exist"))
    if structural:
        raise BadInputError(DATASET, structural, fatal=True)

    trainval = list_images(os.path.join(src, "trainval-image"))
    test = list_images(os.path.join(src, "test-image"))
    fold_name = f"tn3k-trainval-fold{fold}.json"
    fold_path = os.path.join(src, fold_name)
    train_idx, val_idx = read_fold(fold_path, len(trainval), fold_name)

    # (part, index in its sorted list, file name, split)
    samples: list[tuple[str, int, str, str]] = []
    samples += [("trainval", i, trainval[i], "train") for i in sorted(train_idx)]
    samples += [("trainval", i, trainval[i], "val") for i in sorted(val_idx)]
    samples += [("test", i, name, "test") for i, name in enumerate(test)]
    unassigned = len(trainval) - len(train_idx) - len(val_idx)

    records: list[GroundingRecord] = []
    bad: list[BadInput] = []
    multi: list[str] = []
    used_files = [fold_path]
    for part, index, name, split in samples:
        image_path = os.path.join(src, f"{part}-image", name)
        mask_path = _find_mask(os.path.join(src, f"{part}-mask"), name)
        info, pair_bad = read_image_and_mask(
            image_path,
            mask_path,
            image_display=os.path.relpath(image_path, src),
            mask_display=os.path.relpath(mask_path, src) if mask_path else f"{part}-mask/{name}",
            rule=rule,
            threshold=mask_threshold,
        )
        if pair_bad or info is None:
            bad += pair_bad
            continue
        used_files += [image_path, mask_path]  # type: ignore[list-item]
        rec_id = f"{part}/{os.path.splitext(name)[0]}"
        records.append(
            GroundingRecord(
                id=rec_id,
                image=relpath_from(out, image_path),
                height=info.height,
                width=info.width,
                query=QUERY,
                box=info.box,  # type: ignore[arg-type]
                dataset=DATASET,
                split=split,
                provenance={
                    "source": "TN3K",
                    "part": part,
                    "index": index,
                    "fold": fold,
                    "mask": relpath_from(out, mask_path),  # type: ignore[arg-type]
                    "n_components": info.n_components,
                },
            )
        )
        if info.n_components > 1:
            multi.append(rec_id)

    check_bad_inputs(DATASET, bad, skip_bad=skip_bad)
    manifest = build_manifest(
        dataset=DATASET,
        converter="data_prep.tn3k",
        src=src,
        out_dir=out,
        records=records,
        options={"fold": fold, "mask_threshold": mask_threshold},
        mask_rule=rule,
        multi_component_ids=multi,
        source_hashes=hash_sources(src, used_files),
        skipped=bad,
        extra={"trainval_images_in_no_fold_list": unassigned},
    )
    write_outputs(out, records, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("TN3K -> unified grounding JSONL (official test split + one fold).")
    parser.add_argument(
        "--fold",
        type=int,
        default=0,
        choices=range(N_FOLDS),
        help="which tn3k-trainval-fold{k}.json gives train/val",
    )
    args = parser.parse_args(argv)
    return run_cli(
        lambda: convert(
            args.src,
            args.out,
            fold=args.fold,
            skip_bad=args.skip_bad,
            rule=args.rule,
            mask_threshold=args.mask_threshold,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
