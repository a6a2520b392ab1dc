"""Unit tests for data_prep.phantoms: the three real on-disk layouts, ground truth equal to the
written masks, byte-for-byte determinism, the easy/hard difficulty knob, and argument checks."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.phantoms import PRESETS, make_phantom, resolve_difficulty


def _tree_hash(root) -> dict[str, str]:
    out = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def _mask_box(path) -> list[float]:
    m = np.asarray(Image.open(path)) > 127
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_ham10000_layout(tmp_path):
    s = make_phantom("ham10000", tmp_path / "ham", n_images=20, images_per_lesion=(2, 4), seed=3)
    root = tmp_path / "ham"
    with open(root / "HAM10000_metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    assert [r["image_id"] for r in rows] == [f"ISIC_{24306 + i:07d}" for i in range(20)]
    per_lesion: dict[str, int] = {}
    for r in rows:
        per_lesion[r["lesion_id"]] = per_lesion.get(r["lesion_id"], 0) + 1
        assert (root / f"{r['image_id']}.jpg").is_file()
        mask = np.asarray(Image.open(root / f"{r['image_id']}_segmentation.png"))
        assert set(np.unique(mask).tolist()) <= {0, 255} and mask.shape == (112, 112)
    counts = list(per_lesion.values())
    assert all(2 <= c <= 4 for c in counts[:-1]) and 1 <= counts[-1] <= 4  # last may be cut short
    assert 20 // 4 <= len(per_lesion) <= 20 // 2 + 1  # 2..4 photos per lesion
    assert [i.part for i in s.images] == [r["lesion_id"] for r in rows]
    for img in s.images:  # truth box == box of the written mask
        assert img.union_box == _mask_box(root / img.mask)


def test_tn3k_layout_folds_and_multi_nodules(tmp_path):
    s = make_phantom("tn3k", tmp_path / "tn3k", n_images=50, test_frac=0.2, seed=1)
    root = tmp_path / "tn3k"
    # 50 images: test floor(50*0.2+0.5) = 10, trainval 40; two-nodule masks floor(50*0.12+0.5) = 6
    assert sorted(os.listdir(root / "test-image")) == [f"{i:04d}.jpg" for i in range(10)]
    assert sorted(os.listdir(root / "trainval-mask")) == [f"{i:04d}.jpg" for i in range(40)]
    assert s.n_multi_target == 6 == sum(len(i.boxes) == 2 for i in s.images)
    vals = []
    for k in range(5):
        fold = json.loads((root / f"tn3k-trainval-fold{k}.json").read_text())
        assert sorted(fold["train"] + fold["val"]) == list(range(40))  # a partition of trainval
        assert len(fold["val"]) == 8  # 40 / 5
        vals += fold["val"]
    assert sorted(vals) == list(range(40))  # the five val sets are disjoint and cover trainval
    with Image.open(root / "trainval-mask" / "0000.jpg") as m:
        assert m.format == "JPEG"  # lossy masks, as in the real TN3K


def test_heel_csv_and_mask_variants(tmp_path):
    a = make_phantom("heel", tmp_path / "a", n_images=6, heel_format="csv", seed=2)
    b = make_phantom("heel", tmp_path / "b", n_images=6, heel_annotation="mask", seed=2)
    rows = list(csv.DictReader((tmp_path / "a" / "annotations.csv").read_text().splitlines()))
    assert list(rows[0]) == ["image", "x1", "y1", "x2", "y2"]
    assert [[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows] == [
        i.union_box for i in a.images
    ]
    lines = [json.loads(x) for x in (tmp_path / "b" / "annotations.jsonl").read_text().splitlines()]
    assert lines[0] == {"image": "images/heel_00000.png", "mask": "masks/heel_00000.png"}
    assert [i.union_box for i in a.images] == [i.union_box for i in b.images]  # same draws


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for kind in ("ham10000", "tn3k", "heel"):
        make_phantom(kind, tmp_path / f"{kind}1", n_images=8, seed=5)
        make_phantom(kind, tmp_path / f"{kind}2", n_images=8, seed=5)
        make_phantom(kind, tmp_path / f"{kind}3", n_images=8, seed=6)
        h1, h2, h3 = (_tree_hash(tmp_path / f"{kind}{i}") for i in (1, 2, 3))
        assert h1 == h2
        assert h1.keys() == h3.keys() and h1 != h3


def _target_stats(kind: str, preset: str, root) -> tuple[float, float]:
    """(mean box area / image area, mean |mean inside - mean of a 3 px ring outside|)."""
    from scipy import ndimage

    s = make_phantom(kind, root, n_images=24, preset=preset, seed=0)
    areas, contrasts = [], []
    for img in s.images:
        pixels = np.asarray(Image.open(os.path.join(root, img.image)).convert("L"), dtype=float)
        mask = np.asarray(Image.open(os.path.join(root, img.mask))) > 127
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        x1, y1, x2, y2 = img.union_box
        areas.append((x2 - x1) * (y2 - y1) / pixels.size)
        contrasts.append(abs(pixels[mask].mean() - pixels[ring].mean()))
    return float(np.mean(areas)), float(np.mean(contrasts))


@pytest.mark.parametrize("kind", ["ham10000", "tn3k"])
def test_hard_targets_are_smaller_and_fainter(tmp_path, kind):
    easy_area, easy_contrast = _target_stats(kind, "easy", tmp_path / "easy")
    hard_area, hard_contrast = _target_stats(kind, "hard", tmp_path / "hard")
    # preset diameters differ ~3-4x (ham10000 0.40-0.70 vs 0.10-0.20, tn3k 0.28-0.45 vs
    # 0.08-0.16), so areas ~9-16x before pixel rounding and the fan's cap on easy nodules
    assert hard_area < easy_area / 4
    assert hard_contrast < easy_contrast * 0.75


def test_presets_and_overrides():
    d = resolve_difficulty("heel", "hard", contrast=0.9)
    assert d.contrast == 0.9 and d.size_range == PRESETS["heel"]["hard"].size_range
    with pytest.raises(ValueError, match=r"kind='cxr'"):
        resolve_difficulty("cxr", "easy")
    with pytest.raises(ValueError, match=r"preset='medium'"):
        resolve_difficulty("heel", "medium")
    with pytest.raises(ValueError, match="size_range"):
        resolve_difficulty("heel", "easy", size_range=(0.5, 0.2))


def test_refuses_to_overwrite_what_is_not_a_phantom(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "precious.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not one"):
        make_phantom("heel", tmp_path / "real", n_images=2, overwrite=True)
    assert os.listdir(tmp_path / "real") == ["precious.jpg"]
    make_phantom("heel", tmp_path / "ph", n_images=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_phantom("heel", tmp_path / "ph", n_images=3)
    make_phantom("heel", tmp_path / "ph", n_images=3, overwrite=True)
    assert len(os.listdir(tmp_path / "ph" / "images")) == 3
    assert sorted(os.listdir(tmp_path)) == ["ph", "real"]  # no temp folders left


@pytest.mark.slow
def test_time_1000_images(tmp_path):
    """Reports the generation speed (issue 2 asks for < 1 min per 1,000 images); not asserted."""
    for kind in ("ham10000", "tn3k", "heel"):
        start = time.perf_counter()
        s = make_phantom(kind, tmp_path / kind, n_images=1000, seed=0)
        print(f"{kind}: 1000 images at 112x112 in {time.perf_counter() - start:.1f} s")
        assert len(s.images) == 1000
