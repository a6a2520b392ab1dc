"""Integration: phantoms in the three real layouts -> converters -> unified JSONL + manifest.

Covers exact split counts and boxes (a mask drawn with a known rectangle gives exactly that box),
the union vs largest rule on real two-nodule TN3K masks, determinism (same hashes twice), the
dataset reader on the output, the CLIs, and COCO export loaded by pycocotools."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import coco, ham10000, heel, tn3k
from data_prep.phantoms import make_phantom
from medloc.data import GroundingDataset, read_records


def _hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _all_records(out) -> dict[str, object]:
    recs = {}
    for split in ("train", "val", "test"):
        for r in read_records(os.path.join(out, f"{split}.jsonl")):
            recs[r.id] = r
    return recs


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return {
        # 60 photos, exactly 3 per lesion -> 20 lesions
        "ham10000": make_phantom(
            "ham10000", root / "ham10000", n_images=60, images_per_lesion=(3, 3), seed=11
        ),
        # 50 frames: 10 test, 40 trainval; 6 with two nodules
        "tn3k": make_phantom("tn3k", root / "tn3k", n_images=50, test_frac=0.2, seed=12),
        # 30 X-rays with box annotations (JSONL)
        "heel": make_phantom("heel", root / "heel", n_images=30, seed=13),
    }


def test_ham10000_counts_boxes_and_lesion_split(phantoms, tmp_path):
    s = phantoms["ham10000"]
    m = ham10000.convert(s.out_dir, str(tmp_path / "out"), seed=0)
    # 20 lesions at (0.7, 0.1, 0.2): 14 / 2 / 4 lesions x 3 photos = 42 / 6 / 12 records
    assert m["counts"] == {"train": 42, "val": 6, "test": 12}
    assert m["lesions_per_split"] == {"train": 14, "val": 2, "test": 4}
    assert m["mask_rule"] == "union" and m["skipped"] == [] and m["n_multi_component_masks"] == 0
    recs = _all_records(tmp_path / "out")
    truth = {os.path.splitext(i.image)[0]: i for i in s.images}
    assert set(recs) == set(truth)
    split_of_lesion: dict[str, str] = {}
    for rid, r in recs.items():
        assert r.box == truth[rid].union_box  # PNG masks: exact
        assert (r.width, r.height) == (112, 112) and r.query == "the skin lesion"
        assert split_of_lesion.setdefault(r.provenance["lesion_id"], r.split) == r.split
    # records point at the source images (relative to the output folder), nothing copied
    rec = recs["ISIC_0024306"]
    assert rec.image == os.path.relpath(
        os.path.join(s.out_dir, "ISIC_0024306.jpg"), tmp_path / "out"
    )
    assert sorted(os.listdir(tmp_path / "out")) == [
        "manifest.json",
        "test.jsonl",
        "train.jsonl",
        "val.jsonl",
    ]
    # 60 images + 60 masks + the CSV are hashed
    assert len(m["source_sha256"]) == 121
    ds = GroundingDataset(tmp_path / "out" / "test.jsonl")
    assert len(ds) == 12 and ds[0].image.size == (112, 112)


def test_known_rectangle_gives_exactly_that_box(phantoms, tmp_path):
    import shutil

    src = tmp_path / "ham"
    shutil.copytree(phantoms["ham10000"].out_dir, src)
    mask = np.zeros((112, 112), dtype=np.uint8)
    mask[37:81, 10:96] = 255  # rows 37..80, cols 10..95 -> [10, 37, 96, 81]
    Image.fromarray(mask).save(src / "ISIC_0024310_segmentation.png")
    ham10000.convert(str(src), str(tmp_path / "out"))
    assert _all_records(tmp_path / "out")["ISIC_0024310"].box == [10.0, 37.0, 96.0, 81.0]

    # the same through a lossy JPEG TN3K mask
    src = tmp_path / "tn3k"
    shutil.copytree(phantoms["tn3k"].out_dir, src)
    Image.fromarray(mask).save(src / "test-mask" / "0003.jpg", format="JPEG", quality=80)
    tn3k.convert(str(src), str(tmp_path / "out_tn3k"))
    assert _all_records(tmp_path / "out_tn3k")["test/0003"].box == [10.0, 37.0, 96.0, 81.0]


def test_tn3k_counts_boxes_and_rules(phantoms, tmp_path):
    s = phantoms["tn3k"]
    union = tn3k.convert(s.out_dir, str(tmp_path / "union"), fold=3)
    # official test = 10 frames; fold 3 of 40 trainval: val 40/5 = 8, train 32
    assert union["counts"] == {"train": 32, "val": 8, "test": 10}
    assert union["n_multi_component_masks"] == 6 == s.n_multi_target
    fold = json.loads(Path(s.out_dir, "tn3k-trainval-fold3.json").read_text())
    recs = _all_records(tmp_path / "union")
    assert sorted(r.provenance["index"] for r in recs.values() if r.split == "val") == sorted(
        fold["val"]
    )
    largest = tn3k.convert(s.out_dir, str(tmp_path / "largest"), fold=3, rule="largest")
    assert largest["mask_rule"] == "largest" and largest["n_multi_component_masks"] == 6
    recs_l = _all_records(tmp_path / "largest")
    truth = {f"{i.part}/{os.path.splitext(os.path.basename(i.image))[0]}": i for i in s.images}
    n_two = 0
    for rid, r in recs.items():
        t = truth[rid]
        assert r.box == t.union_box  # JPEG masks of these shapes binarise back exactly
        assert r.provenance["n_components"] == len(t.boxes)
        if len(t.boxes) == 2:
            n_two += 1
            assert recs_l[rid].box in t.boxes and recs_l[rid].box != r.box
            x1, y1, x2, y2 = r.box  # the union contains the largest component's box
            lx1, ly1, lx2, ly2 = recs_l[rid].box
            assert x1 <= lx1 and y1 <= ly1 and lx2 <= x2 and ly2 <= y2
        else:
            assert recs_l[rid].box == r.box
    assert n_two == 6


def test_heel_counts_boxes_and_formats(phantoms, tmp_path):
    s = phantoms["heel"]
    m = heel.convert(s.out_dir, str(tmp_path / "out"), seed=0)
    # 30 images at (0.7, 0.1, 0.2): test floor(6.5) = 6, val floor(3.5) = 3, train 21
    assert m["counts"] == {"train": 21, "val": 3, "test": 6}
    recs = _all_records(tmp_path / "out")
    truth = {os.path.splitext(i.image)[0]: i.union_box for i in s.images}
    assert {rid: r.box for rid, r in recs.items()} == truth
    assert recs["images/heel_00000"].query == heel.DEFAULT_QUERY
    # the same draws written as CSV boxes or as masks convert to the same boxes
    raw = tmp_path / "raw"
    make_phantom("heel", raw / "csv", n_images=30, seed=13, heel_format="csv")
    make_phantom("heel", raw / "mask", n_images=30, seed=13, heel_annotation="mask")
    heel.convert(str(raw / "csv"), str(tmp_path / "csv"))
    heel.convert(str(raw / "mask"), str(tmp_path / "mask"))
    assert {k: r.box for k, r in _all_records(tmp_path / "csv").items()} == truth
    assert {k: r.box for k, r in _all_records(tmp_path / "mask").items()} == truth


def test_heel_split_column_inclusive_boxes_and_clipping(tmp_path):
    src = tmp_path / "raw"
    (src / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(src / "img" / "a.png")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(src / "img" / "b.png")
    rows = [
        {"image": "img/a.png", "bbox": [5, 6, 14, 20], "split": "test", "query": "the spur"},
        {"image": "img/a.png", "bbox": [0, 0, 49, 39], "split": "test"},
        {"image": "img/b.png", "bbox": [40, 30, 55, 45], "split": "train"},
    ]
    (src / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = heel.convert(
        str(src),
        str(tmp_path / "out"),
        annotations="ann.jsonl",
        box_convention="inclusive",
        clip_boxes=True,
    )
    assert m["counts"] == {"train": 1, "val": 0, "test": 2}
    recs = _all_records(tmp_path / "out")
    # inclusive last-pixel indices: x2 + 1, y2 + 1
    assert recs["img/a"].box == [5.0, 6.0, 15.0, 21.0] and recs["img/a"].query == "the spur"
    assert recs["img/a#1"].box == [0.0, 0.0, 50.0, 40.0]  # second box on the same image
    # [40, 30, 56, 46] clipped to the 50x40 image
    assert recs["img/b"].box == [40.0, 30.0, 50.0, 40.0]


def test_conversion_is_deterministic(phantoms, tmp_path):
    for name, mod in (("ham10000", ham10000), ("tn3k", tn3k), ("heel", heel)):
        out = tmp_path / name
        mod.convert(phantoms[name].out_dir, str(out))
        first = {f: _hash(out / f) for f in sorted(os.listdir(out))}
        mod.convert(phantoms[name].out_dir, str(out))
        assert {f: _hash(out / f) for f in sorted(os.listdir(out))} == first
        assert len(first) == 4


def test_cli_and_coco_export(phantoms, tmp_path, capsys):
    from pycocotools.coco import COCO

    out = tmp_path / "tn3k"
    assert tn3k.main(["--src", phantoms["tn3k"].out_dir, "--out", str(out), "--fold", "1"]) == 0
    assert "tn3k: wrote 50 records" in capsys.readouterr().out
    assert coco.main(["--jsonl", str(out / "test.jsonl")]) == 0
    api = COCO(str(out / "test_coco.json"))
    recs = read_records(out / "test.jsonl")
    assert len(api.getImgIds()) == len(recs) == 10
    assert api.loadCats(api.getCatIds())[0]["name"] == "tn3k"
    ann = api.loadAnns(api.getAnnIds(imgIds=[1]))[0]
    x1, y1, x2, y2 = recs[0].box
    assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]  # xyxy -> xywh
    assert ann["area"] == (x2 - x1) * (y2 - y1) and ann["record_id"] == recs[0].id
    assert api.loadImgs([1])[0]["file_name"] == recs[0].image
