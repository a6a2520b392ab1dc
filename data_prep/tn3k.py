"""TN3K (thyroid ultrasound) -> unified grounding JSONL (docs/method.md §7).

Reads the real on-disk layout (also what ``data_prep.phantoms`` writes)::

    <src>/trainval-image/NNNN.jpg      <src>/trainval-mask/NNNN.jpg   (masks are lossy JPEG)
    <src>/test-image/NNNN.jpg          <src>/test-mask/NNNN.jpg
    <src>/tn3k-trainval-fold{0..4}.json   {"train": [i, ...], "val": [j, ...]}

Image numbers: a file belongs to the dataset when its stem is a number (``0042.jpg`` is image
42; the suffix may be any image suffix in any case: ``0042.JPG``, ``0042.Png``). Other image
files (``0001 - Copy.jpg``) match no sample: they are listed in one warning (manifest
``"warnings"``) and never used, so they cannot move another image.

Splits: ``test`` is every numbered image of the official test folder; ``train``/``val`` are the
images whose NUMBERS the chosen fold file lists. In the released TN3K the trainval images are
numbered 0000..2878, so the number is also the position in the numerically sorted folder (how
the TRFE-Net loader indexes it, while other loaders open ``"{:04d}.jpg".format(i)``); reading the
number, not the position, keeps membership fixed whatever else the folder holds. A listed number
without an image is bad input; numbered trainval images in neither list are left out and counted
in the manifest (``trainval_images_in_no_fold_list``).

Masks: image N's mask is the file numbered N in the matching ``*-mask`` folder (the same file
name preferred when several exist). A numbered TEST mask without an image is bad input: the
official test set would silently lose a sample (fix the folder or ``--skip-bad``, which lists it
as skipped); unused trainval masks are only listed in the warning. Masks are binarised with
``> 127`` (JPEG) and read as ``data_prep.masks`` describes (palette colours, alpha, full-frame
check).

Multi-nodule masks: the share usually quoted for the real test set, 11.7% (docs/method.md §7), counts
4-connected components. This converter counts 8-CONNECTED components (pixels touching at a corner
are one nodule; ``data_prep.masks``), which on the 614 real test masks gives 70 masks with two
or more components, 11.4%: the number the manifest's ``n_multi_component_masks`` reports. The
mask -> box rule (``union`` default, or ``largest``) is an option.

CLI: ``python -m data_prep.tn3k --src RAW --out OUT [--fold 0] [--skip-bad] [--rule union|largest]
[--mask-threshold 127] [--max-mask-fraction 0.95] [--allow-full-frame-mask]``
"""

from __future__ import annotations

import json
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
    has_image_suffix,
    hash_sources,
    mask_kwargs,
    read_text,
    relpath_from,
    run_cli,
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

DATASET = "tn3k"
QUERY = "the thyroid nodule"
N_FOLDS = 5
PARTS = ("trainval", "test")


def image_number(name: str) -> int | None:
    """The TN3K number of an image file name (``"0042.jpg"`` -> 42), or None if not numbered."""
    stem = os.path.splitext(name)[0]
    return int(stem) if stem.isascii() and stem.isdigit() else None


def index_folder(folder: str) -> tuple[dict[int, list[str]], list[str]]:
    """Image files of ``folder``: ``({number: [file names]}, [names that are not numbered])``.

    Hidden files and files without an image suffix are ignored; lists are sorted by name.
    """
    numbered: dict[int, list[str]] = {}
    others: list[str] = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not has_image_suffix(name):
            continue
        if not os.path.isfile(os.path.join(folder, name)):
            continue
        number = image_number(name)
        if number is None:
            others.append(name)
        else:
            numbered.setdefault(number, []).append(name)
    return dict(sorted(numbered.items())), others


def list_images(folder: str) -> list[str]:
    """Numbered image file names in ``folder``, sorted by number (then name)."""
    numbered, _ = index_folder(folder)
    return [name for names in numbered.values() for name in names]


def _pick_mask(masks: dict[int, list[str]], number: int, image_name: str) -> tuple[str | None, str]:
    """``(mask name or None, why not)`` for image ``number``: the only file with that number,
    else the one with exactly the image's file name."""
    names = masks.get(number, [])
    if len(names) == 1:
        return names[0], ""
    if image_name in names:
        return image_name, ""
    if not names:
        return None, "mask file does not exist"
    return None, f"several masks numbered {number}: {', '.join(names)}"


def read_fold(path: str, display: str) -> tuple[list[int], list[int]]:
    """Read ``{"train": [...], "val": [...]}`` of image numbers (UTF-8, a BOM is accepted);
    every structural problem is fatal."""
    if not os.path.isfile(path):
        raise BadInputError(DATASET, [BadInput(display, "fold file does not exist")], fatal=True)
    text, _ = read_text(DATASET, path, display, kind="json")
    try:
        fold = json.loads(text)
    except json.JSONDecodeError as exc:
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
        negative = sorted({v for v in values if v < 0})
        if negative:
            problems.append(
                BadInput(display, f"{key!r} has negative image numbers {negative[:10]}")
            )
        if len(set(values)) != len(values):
            problems.append(BadInput(display, f"{key!r} has repeated image numbers"))
        lists[key] = values
    if not problems:
        both = sorted(set(lists["train"]) & set(lists["val"]))
        if both:
            problems.append(BadInput(display, f"image numbers in both train and val: {both[:10]}"))
        elif not lists["train"] and not lists["val"]:
            problems.append(BadInput(display, "lists no image (train and val are both empty)"))
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
    max_mask_fraction: float = DEFAULT_MAX_MASK_FRACTION,
    allow_full_frame_mask: bool = False,
) -> dict[str, Any]:
    """Convert a TN3K folder; returns the manifest (also written to ``<out>/manifest.json``).

    Raises ``BadInputError`` listing every offender (and writes nothing) unless ``skip_bad``;
    files that match no sample go to the manifest's warnings and a ``ConverterWarning``.
    """
    rule = check_mask_rule(rule)
    max_mask_fraction = check_max_mask_fraction(max_mask_fraction)
    if not 0 <= fold < N_FOLDS:
        raise ValueError(f"fold={fold}; expected 0..{N_FOLDS - 1}")
    check_out_dir(DATASET, out)
    structural: list[BadInput] = []
    for part in ("trainval-image", "trainval-mask", "test-image", "test-mask"):
        if not os.path.isdir(os.path.join(src, part)):
            structural.append(BadInput(os.path.join(src, part), "folder does not exist"))
    if structural:
        raise BadInputError(DATASET, structural, fatal=True)

    images: dict[str, dict[int, list[str]]] = {}
    masks: dict[str, dict[int, list[str]]] = {}
    notes: list[BadInput] = []
    for part in PARTS:
        images[part], odd_images = index_folder(os.path.join(src, f"{part}-image"))
        masks[part], odd_masks = index_folder(os.path.join(src, f"{part}-mask"))
        for folder, odd in ((f"{part}-image", odd_images), (f"{part}-mask", odd_masks)):
            if odd:
                notes.append(
                    BadInput(
                        f"{folder}/",
                        f"{len(odd)} file(s) whose name is not an image number, not used: "
                        + ", ".join(odd),
                    )
                )
        if not images[part]:
            raise fatal(
                DATASET,
                f"{part}-image/",
                "holds no numbered image (NNNN.jpg)"
                + (f"; found only {', '.join(odd_images[:5])}" if odd_images else ""),
                notes,
            )
    fold_name = f"tn3k-trainval-fold{fold}.json"
    fold_path = os.path.join(src, fold_name)
    train_ids, val_ids = read_fold(fold_path, fold_name)

    bad: list[BadInput] = []
    # (part, image number, split); every listed number must have exactly one image
    samples: list[tuple[str, int, str]] = []
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for number in sorted(ids):
            if number not in images["trainval"]:
                bad.append(
                    BadInput(
                        fold_name,
                        f"{split!r} lists image {number} but trainval-image/ has no image "
                        f"numbered {number} (e.g. {number:04d}.jpg)",
                    )
                )
            else:
                samples.append(("trainval", number, split))
    samples += [("test", number, "test") for number in images["test"]]
    listed = set(train_ids) | set(val_ids)
    unassigned = sum(n not in listed for n in images["trainval"])
    orphans = sorted(set(masks["test"]) - set(images["test"]))
    for number in orphans:
        for name in masks["test"][number]:
            bad.append(
                BadInput(
                    f"test-mask/{name}",
                    f"test mask without an image: no test-image/ file numbered {number}; the "
                    "official test set would lose this sample",
                )
            )
    unused = sorted(set(masks["trainval"]) - set(images["trainval"]))
    if unused:
        names = [n for number in unused for n in masks["trainval"][number]]
        notes.append(
            BadInput(
                "trainval-mask/",
                f"{len(names)} mask(s) without a trainval image, not used: " + ", ".join(names),
            )
        )

    records: list[GroundingRecord] = []
    multi: list[str] = []
    used_files = [fold_path]
    for part, number, split in samples:
        names = images[part][number]
        if len(names) > 1:
            bad.append(
                BadInput(
                    f"{part}-image/{names[0]}",
                    f"several images numbered {number}: {', '.join(names)}",
                )
            )
            continue
        name = names[0]
        mask_name, why = _pick_mask(masks[part], number, name)
        image_path = os.path.join(src, f"{part}-image", name)
        if mask_name is None and why != "mask file does not exist":
            bad.append(BadInput(f"{part}-mask/{name}", why))
            continue
        mask_path = os.path.join(src, f"{part}-mask", mask_name) if mask_name else None
        info, pair_bad = read_image_and_mask(
            image_path,
            mask_path,
            image_display=os.path.relpath(image_path, src),
            mask_display=os.path.relpath(mask_path, src) if mask_path else f"{part}-mask/{name}",
            rule=rule,
            threshold=mask_threshold,
            max_mask_fraction=max_mask_fraction,
            allow_full_frame_mask=allow_full_frame_mask,
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
                    "index": number,
                    "fold": fold,
                    "mask": relpath_from(out, mask_path),  # type: ignore[arg-type]
                    "n_components": info.n_components,
                    **info.mask_provenance(),
                },
            )
        )
        if info.n_components > 1:
            multi.append(rec_id)

    check_bad_inputs(DATASET, bad, skip_bad=skip_bad, notes=notes)
    check_has_records(DATASET, records, src, bad, "no image/mask pair could be read")
    manifest = build_manifest(
        dataset=DATASET,
        converter="data_prep.tn3k",
        src=src,
        out_dir=out,
        records=records,
        options={
            "fold": fold,
            "mask_threshold": mask_threshold,
            "max_mask_fraction": max_mask_fraction,
            "allow_full_frame_mask": allow_full_frame_mask,
        },
        mask_rule=rule,
        multi_component_ids=multi,
        source_hashes=hash_sources(src, used_files),
        skipped=bad,
        warnings=notes,
        extra={"trainval_images_in_no_fold_list": unassigned},
    )
    write_outputs(out, records, manifest)
    emit_warnings(DATASET, notes)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("TN3K -> unified grounding JSONL (official test split + one fold).",
                         layout=__doc__.split("\nCLI:")[0])
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
            **mask_kwargs(args),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
