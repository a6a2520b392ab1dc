"""Integration: real medical pixels nobody here drew. DICOM files shipped inside the pydicom wheel
(CT, MR, ultrasound RGB and palette colour) are put in a HEEL-style folder with a CSV annotation
file, converted, loaded through GroundingDataset and passed through the real Qwen2-VL image
processor (the one Qwen2.5-VL uses); pixel_values / image_grid_thw must follow smart_resize."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest

from data_prep import heel
from medloc.data import GroundingDataset

# Only files inside the wheel: pydicom.data.get_testdata_file() would try the network for others.
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")

# file -> (modality, width, height, a hand-chosen box inside the image)
CASES = {
    "CT_small.dcm": ("CT", 128, 128, [30, 40, 90, 100]),
    "MR_small.dcm": ("MR", 64, 64, [10, 12, 40, 50]),
    "examples_rgb_color.dcm": ("US", 320, 240, [100, 60, 200, 150]),
    "examples_palette.dcm": ("US", 800, 350, [300, 100, 500, 250]),
}

MIN_PIXELS, MAX_PIXELS = 10_000, 50_000
# smart_resize(h, w, factor=28, min_pixels=10000, max_pixels=50000), worked by hand:
# CT 128x128: round(128/28)=5 -> 140x140 = 19600, inside [10000, 50000]       -> grid 10x10
# MR 64x64:   round(64/28)=2 -> 56x56 = 3136 < 10000; beta = sqrt(10000/4096) = 1.5625,
#             ceil(64*1.5625/28) = ceil(3.57) = 4 -> 112x112                    -> grid 8x8
# US 240x320 (HxW): 252x308 = 77616 > 50000; beta = sqrt(76800/50000) = 1.2394,
#             floor(240/1.2394/28) = 6 -> 168, floor(320/1.2394/28) = 9 -> 252   -> grid 12x18
# US 350x800: round(12.5)=12 -> 336, round(28.57)=29 -> 812, 272832 > 50000;
#             beta = sqrt(280000/50000) = 2.3664, floor(5.28)=5 -> 140, floor(12.07)=12 -> 336
#                                                                                 -> grid 10x24
EXPECTED_GRID = {
    "CT_small.dcm": (1, 10, 10),
    "MR_small.dcm": (1, 8, 8),
    "examples_rgb_color.dcm": (1, 12, 18),
    "examples_palette.dcm": (1, 10, 24),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    src = root / "raw"
    (src / "dicom").mkdir(parents=True)
    lines = ["image,x1,y1,x2,y2,split"]
    for name, (_, _, _, box) in CASES.items():
        shutil.copy(os.path.join(PYDICOM_FILES, name), src / "dicom" / name)
        lines.append(f"dicom/{name}," + ",".join(str(v) for v in box) + ",test")
    (src / "annotations.csv").write_text("\n".join(lines) + "\n")
    manifest = heel.convert(str(src), str(root / "out"))
    return root / "out", manifest


def test_dicom_converts_with_original_sizes(converted):
    out, manifest = converted
    assert manifest["counts"] == {"train": 0, "val": 0, "test": 4}
    ds = GroundingDataset(out / "test.jsonl")
    by_name = {os.path.basename(r.image): (r, i) for i, r in enumerate(ds.records)}
    for name, (modality, w, h, box) in CASES.items():
        rec, idx = by_name[name]
        assert (rec.width, rec.height) == (w, h) and rec.box == [float(v) for v in box]
        assert pydicom.dcmread(ds.image_path(idx)).Modality == modality
        img = np.asarray(ds[idx].image)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        assert img.max() > img.min()  # real content, not a blank frame
        grey = (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all()
        assert grey == (modality in ("CT", "MR"))  # greyscale CT/MR, colour ultrasound


def test_qwen_image_processor_follows_smart_resize(converted):
    import torch
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    torch.set_num_threads(1)
    out, _ = converted
    ds = GroundingDataset(out / "test.jsonl")
    proc = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    patch, merge, temporal = proc.patch_size, proc.merge_size, proc.temporal_patch_size
    assert (patch, merge, temporal) == (14, 2, 2)
    for idx, rec in enumerate(ds.records):
        name = os.path.basename(rec.image)
        batch = proc(images=[ds[idx].image], return_tensors="pt")
        grid = tuple(int(v) for v in batch["image_grid_thw"][0])
        assert grid == EXPECTED_GRID[name]
        h_bar, w_bar = smart_resize(rec.height, rec.width, patch * merge, MIN_PIXELS, MAX_PIXELS)
        assert grid == (1, h_bar // patch, w_bar // patch)
        assert MIN_PIXELS <= h_bar * w_bar <= MAX_PIXELS
        # one row per 14x14 patch, each 3 channels x 2 frames x 14 x 14 = 1176 values
        assert tuple(batch["pixel_values"].shape) == (
            grid[0] * grid[1] * grid[2],
            3 * temporal * patch**2,
        )
        assert torch.isfinite(batch["pixel_values"]).all()
