"""The three layout writers: render ``n`` images into a folder in one real dataset's on-disk layout
(file names, annotation files, splits) and return their ground truth."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from data_prep.phantoms.render import (
    bbox_of,
    lesion_look,
    render_dermoscopy,
    render_ultrasound,
    render_xray,
)
from data_prep.phantoms.spec import KIND_CODE, Difficulty, HeelAnnotation, HeelFormat, PhantomImage


def _save(array: np.ndarray, path: str, fmt: str, **params: Any) -> None:
    Image.fromarray(array).save(path, format=fmt, **params)


_JPEG = {"quality": 90, "optimize": False, "progressive": False, "subsampling": 2}
_DX = (
    ("nv", 0.67),
    ("mel", 0.11),
    ("bkl", 0.11),
    ("bcc", 0.05),
    ("akiec", 0.03),
    ("vasc", 0.015),
    ("df", 0.015),
)
_DX_TYPE = ("histo", "follow_up", "consensus", "confocal")
_LOCALIZATION = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "scalp",
)


def write_ham10000(
    out: str,
    n: int,
    h: int,
    w: int,
    difficulty: Difficulty,
    seed: int,
    images_per_lesion: tuple[int, int],
) -> tuple[list[PhantomImage], int]:
    code = KIND_CODE["ham10000"]
    plan = np.random.default_rng([seed, code, 0])
    lo, hi = images_per_lesion
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_lesion={images_per_lesion}: expected 1 <= lo <= hi")
    lesion_of_image: list[int] = []
    n_lesions = 0
    while len(lesion_of_image) < n:
        k = int(plan.integers(lo, hi + 1))
        lesion_of_image += [n_lesions] * min(k, n - len(lesion_of_image))
        n_lesions += 1
    dx_names, dx_p = zip(*_DX)
    lesion_rows = []
    looks = []
    for les in range(n_lesions):
        rng = np.random.default_rng([seed, code, 1, les])
        looks.append(lesion_look(rng, difficulty))
        lesion_rows.append(
            {
                "dx": str(rng.choice(dx_names, p=np.asarray(dx_p) / sum(dx_p))),
                "dx_type": str(rng.choice(_DX_TYPE)),
                "age": f"{5 * int(rng.integers(1, 18))}.0",
                "sex": str(rng.choice(("male", "female"))),
                "localization": str(rng.choice(_LOCALIZATION)),
            }
        )
    truth: list[PhantomImage] = []
    csv_buf = io.StringIO()
    writer = csv.writer(csv_buf, lineterminator="\n")
    writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
    for i, les in enumerate(lesion_of_image):
        rng = np.random.default_rng([seed, code, 2, i])
        rgb, mask = render_dermoscopy(rng, h, w, looks[les], difficulty)
        image_id, lesion_id = f"ISIC_{24306 + i:07d}", f"HAM_{les:07d}"
        _save(rgb, os.path.join(out, f"{image_id}.jpg"), "JPEG", **_JPEG)
        _save(
            np.where(mask, 255, 0).astype(np.uint8),
            os.path.join(out, f"{image_id}_segmentation.png"),
            "PNG",
        )
        row = lesion_rows[les]
        writer.writerow(
            [
                lesion_id,
                image_id,
                row["dx"],
                row["dx_type"],
                row["age"],
                row["sex"],
                row["localization"],
            ]
        )
        box = bbox_of(mask)
        truth.append(
            PhantomImage(f"{image_id}.jpg", f"{image_id}_segmentation.png", [box], box, lesion_id)
        )
    with open(os.path.join(out, "HAM10000_metadata.csv"), "w", encoding="utf-8", newline="") as fh:
        fh.write(csv_buf.getvalue())
    return truth, 0


def write_tn3k(
    out: str,
    n: int,
    h: int,
    w: int,
    difficulty: Difficulty,
    seed: int,
    multi_target_frac: float,
    test_frac: float,
) -> tuple[list[PhantomImage], int]:
    code = KIND_CODE["tn3k"]
    plan = np.random.default_rng([seed, code, 0])
    n_test = math.floor(n * test_frac + 0.5)
    n_tv = n - n_test
    n_multi = math.floor(n * multi_target_frac + 0.5)
    multi = {int(i) for i in plan.permutation(n)[:n_multi]}  # global index: trainval, then test
    for part in ("trainval-image", "trainval-mask", "test-image", "test-mask"):
        os.makedirs(os.path.join(out, part), exist_ok=True)
    truth: list[PhantomImage] = []
    for g in range(n):
        part, local = ("trainval", g) if g < n_tv else ("test", g - n_tv)
        rng = np.random.default_rng([seed, code, 2, g])
        gray, masks = render_ultrasound(rng, h, w, 2 if g in multi else 1, difficulty)
        name = f"{local:04d}.jpg"
        union = np.logical_or.reduce(masks)
        _save(gray, os.path.join(out, f"{part}-image", name), "JPEG", **_JPEG)
        _save(
            np.where(union, 255, 0).astype(np.uint8),
            os.path.join(out, f"{part}-mask", name),
            "JPEG",
            **_JPEG,
        )
        truth.append(
            PhantomImage(
                f"{part}-image/{name}",
                f"{part}-mask/{name}",
                [bbox_of(m) for m in masks],
                bbox_of(union),
                part,
            )
        )
    order = plan.permutation(n_tv)
    for k, val in enumerate(np.array_split(order, 5)):
        val_set = {int(i) for i in val}
        fold = {"train": [i for i in range(n_tv) if i not in val_set], "val": sorted(val_set)}
        with open(os.path.join(out, f"tn3k-trainval-fold{k}.json"), "w", encoding="utf-8") as fh:
            json.dump(fold, fh)
    return truth, n_multi


def write_heel(
    out: str,
    n: int,
    h: int,
    w: int,
    difficulty: Difficulty,
    seed: int,
    annotation: HeelAnnotation,
    fmt: HeelFormat,
) -> tuple[list[PhantomImage], int]:
    code = KIND_CODE["heel"]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    if annotation == "mask":
        os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    truth: list[PhantomImage] = []
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rng = np.random.default_rng([seed, code, 2, i])
        gray, mask = render_xray(rng, h, w, difficulty)
        image = f"images/heel_{i:05d}.png"
        _save(gray, os.path.join(out, image), "PNG")
        box = bbox_of(mask)
        mask_rel = None
        if annotation == "mask":
            mask_rel = f"masks/heel_{i:05d}.png"
            _save(np.where(mask, 255, 0).astype(np.uint8), os.path.join(out, mask_rel), "PNG")
            rows.append({"image": image, "mask": mask_rel})
        else:
            rows.append({"image": image, "bbox": box})
        truth.append(PhantomImage(image, mask_rel, [box], box, ""))
    if fmt == "jsonl":
        with open(os.path.join(out, "annotations.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(os.path.join(out, "annotations.csv"), "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if annotation == "mask":
                writer.writerow(["image", "mask"])
                writer.writerows([r["image"], r["mask"]] for r in rows)
            else:
                writer.writerow(["image", "x1", "y1", "x2", "y2"])
                writer.writerows([r["image"], *(f"{v:g}" for v in r["bbox"])] for r in rows)
    return truth, 0
