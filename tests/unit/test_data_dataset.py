"""Unit tests for medloc.data.dataset: load_image (PNG/JPEG/16-bit/DICOM -> 8-bit RGB, clear
errors naming the file), the DICOM VOI window formula, and GroundingDataset's checks."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image

from medloc.data.dataset import (
    GroundingDataset,
    ImageLoadError,
    _window_to_unit,
    is_dicom_file,
    load_image,
)
from medloc.data.records import GroundingRecord, write_records

PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")


def test_png_gray_becomes_rgb(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(arr).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (4, 3)
    out = np.asarray(img)
    assert (out[:, :, 0] == arr).all() and (out[:, :, 2] == arr).all()


def test_16bit_png_is_minmax_scaled(tmp_path):
    arr = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "x16.png")
    out = np.asarray(load_image(tmp_path / "x16.png"))[:, :, 0]
    # (v - 1000) / 4000 * 255: 0, 63.75 -> 64, 127.5 -> 128 (rint: half to even gives 128), 255
    assert out.tolist() == [[0, 64], [128, 255]]


def test_missing_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.jpg: file does not exist"):
        load_image(tmp_path / "nope.jpg")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "cut.jpg")
    assert str(tmp_path / "cut.jpg") in str(info.value)
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ImageLoadError, match=r"junk\.dcm: DICOM decode failed"):
        load_image(tmp_path / "junk.dcm")


def test_window_formula_matches_dicom_standard():
    # PS3.3 C.11.2.1.2.1 with c=600, w=1600: y = (x - 599.5) / 1599 + 0.5, clipped to [0, 1]
    x = np.array([-500.0, -199.5, 600.0, 1398.5, 1399.5])
    # -500 -> -1099.5/1599 + 0.5 < 0 -> 0; -199.5 -> -799/1599 + 0.5 = 0.000313;
    # 600 -> 0.5/1599 + 0.5; 1398.5 -> 799/1599 + 0.5 = 0.999687; 1399.5 -> 800/1599 + 0.5 > 1 -> 1
    expected = [0.0, -799 / 1599 + 0.5, 0.5 / 1599 + 0.5, 799 / 1599 + 0.5, 1.0]
    assert np.allclose(_window_to_unit(x, 600.0, 1600.0), expected, atol=1e-12)


def test_dicom_mr_uses_its_window_and_has_no_suffix_dependence(tmp_path):
    src = os.path.join(PYDICOM_FILES, "MR_small.dcm")  # MR, 64x64 int16, window 600/1600
    raw = pydicom.dcmread(src).pixel_array.astype(np.float64)
    expected = np.rint(np.clip((raw - 599.5) / 1599 + 0.5, 0, 1) * 255).astype(np.uint8)
    img = np.asarray(load_image(src))
    assert img.shape == (64, 64, 3)
    assert (img[:, :, 0] == expected).all() and (img[:, :, 1] == expected).all()
    no_suffix = tmp_path / "IM0001"
    shutil.copy(src, no_suffix)  # hospital exports often have no suffix: the DICM magic decides
    assert is_dicom_file(str(no_suffix))
    assert (np.asarray(load_image(no_suffix)) == img).all()
    minmax = np.asarray(load_image(src, dicom_window="minmax"))[:, :, 0]
    assert minmax.min() == 0 and minmax.max() == 255


def test_dataset_checks_image_size(tmp_path):
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "a.png")
    rec = GroundingRecord(
        id="a",
        image="a.png",
        height=10,
        width=20,
        query="q",
        box=[1, 1, 5, 5],
        dataset="d",
        split="test",
    )
    wrong = GroundingRecord(
        id="b",
        image="a.png",
        height=20,
        width=10,
        query="q",
        box=[1, 1, 5, 5],
        dataset="d",
        split="test",
    )
    write_records(tmp_path / "test.jsonl", [rec, wrong])
    ds = GroundingDataset(tmp_path / "test.jsonl")
    assert len(ds) == 2
    sample = ds[0]
    assert sample.record.id == "a" and sample.image.size == (20, 10)
    assert ds.image_path(0) == str(tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match=r"is 20x10 \(WxH\) but record 'b'"):
        ds[1]
    assert GroundingDataset(tmp_path / "test.jsonl", check_size=False)[1].image.size == (20, 10)
