"""Integration: bad input to the converters (issue 2). Each case gives an error naming the file;
all offenders are reported in ONE summary; nothing is written (earlier outputs survive intact);
the CLI exits non-zero; ``--skip-bad`` leaves the offenders out and lists them in the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import ham10000, heel, tn3k
from data_prep.bad_input import BadInputError
from data_prep.phantoms import make_phantom


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    make_phantom("ham10000", root / "ham10000", n_images=12, images_per_lesion=(2, 2), seed=1)
    make_phantom("tn3k", root / "tn3k", n_images=10, test_frac=0.2, seed=2)
    make_phantom("heel", root / "heel", n_images=6, seed=3)
    return root


def _copy(raw, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(raw / name, dst)
    return dst


def _break_ham(src):
    """Four kinds of bad input at once; returns {offending file name: expected reason part}."""
    os.remove(src / "ISIC_0024306.jpg")  # CSV row without an image
    (src / "ISIC_0024307.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")  # unreadable
    Image.fromarray(np.zeros((112, 112), np.uint8)).save(src / "ISIC_0024308_segmentation.png")
    Image.fromarray(np.full((50, 60), 255, np.uint8)).save(src / "ISIC_0024309_segmentation.png")
    os.remove(src / "ISIC_0024310_segmentation.png")  # image without its mask
    return {
        "HAM10000_metadata.csv:2": "CSV row names ISIC_0024306 but no ISIC_0024306.jpg",
        "ISIC_0024307.jpg": "unreadable image",
        "ISIC_0024308_segmentation.png": "empty mask",
        "ISIC_0024309_segmentation.png": "mask is 60x50 (WxH) but its image ISIC_0024309.jpg is 112x112",
        "ISIC_0024310_segmentation.png": "mask file does not exist",
    }


def _tree(path) -> dict[str, str]:
    return {
        f: hashlib.sha256(Path(path, f).read_bytes()).hexdigest() for f in sorted(os.listdir(path))
    }


def test_ham10000_reports_every_offender_and_writes_nothing(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    out = tmp_path / "out"
    ham10000.convert(str(src), str(out))  # a good earlier conversion
    before = _tree(out)
    expected = _break_ham(src)
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(out))
    got = {b.file: b.reason for b in info.value.offenders}
    assert set(got) == set(expected)
    for file, reason in expected.items():
        assert reason in got[file], (file, got[file])
        assert f"{file}: " in str(info.value)  # each named in the one summary
    assert "5 bad input(s); nothing was written" in str(info.value)
    assert _tree(out) == before  # the earlier outputs are untouched, no temp files


def test_ham10000_skip_bad_lists_skips(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    expected = _break_ham(src)
    m = ham10000.convert(str(src), str(tmp_path / "out"), skip_bad=True)
    assert {s["file"] for s in m["skipped"]} == set(expected)
    assert m["n_records"] == 12 - 5  # 12 photos, 5 of them bad
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == m["skipped"]


def test_ham10000_split_is_stable_when_samples_are_skipped(raw, tmp_path):
    good = ham10000.convert(str(raw / "ham10000"), str(tmp_path / "good"))
    src = _copy(raw, "ham10000", tmp_path)
    _break_ham(src)
    ham10000.convert(str(src), str(tmp_path / "skip"), skip_bad=True)
    split_good, split_skip = {}, {}
    for split in ("train", "val", "test"):
        for line in (tmp_path / "good" / f"{split}.jsonl").read_text().splitlines():
            split_good[json.loads(line)["id"]] = split
        for line in (tmp_path / "skip" / f"{split}.jsonl").read_text().splitlines():
            split_skip[json.loads(line)["id"]] = split
    assert all(split_good[k] == v for k, v in split_skip.items())  # no survivor moved
    assert good["n_records"] == 12


def test_cli_exits_non_zero_with_the_summary(raw, tmp_path, capsys):
    src = _copy(raw, "ham10000", tmp_path)
    _break_ham(src)
    rc = ham10000.main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ISIC_0024307.jpg: unreadable image" in err and "--skip-bad" in err
    assert not (tmp_path / "out").exists()
    assert ham10000.main(["--src", str(src), "--out", str(tmp_path / "out"), "--skip-bad"]) == 0
    assert "5 skipped" in capsys.readouterr().out


def test_ham10000_csv_problems(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    csv_path = src / "HAM10000_metadata.csv"
    lines = csv_path.read_text().splitlines()
    lines.append(lines[1])  # duplicate image_id, line 14
    lines.append(",ISIC_9999999,nv,histo,50.0,male,back")  # no lesion_id, line 15
    lines.append("HAM_0000099,,nv,histo,50.0,male,back")  # no image_id, line 16
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "out"))
    got = {b.file: b.reason for b in info.value.offenders}
    assert "duplicate image_id ISIC_0024306" in got["HAM10000_metadata.csv:14"]
    assert "without a lesion_id" in got["HAM10000_metadata.csv:15"]
    assert "without an image_id" in got["HAM10000_metadata.csv:16"]
    csv_path.write_text("image,lesion\nISIC_0024306,HAM_0000000\n")
    with pytest.raises(BadInputError, match=r"missing column\(s\) \['lesion_id', 'image_id'\]"):
        ham10000.convert(str(src), str(tmp_path / "out"), skip_bad=True)  # fatal even when skipping


def test_tn3k_bad_masks_and_fold(raw, tmp_path):
    src = _copy(raw, "tn3k", tmp_path)
    os.remove(src / "test-mask" / "0001.jpg")
    Image.fromarray(np.zeros((112, 112), np.uint8)).save(src / "trainval-mask" / "0002.jpg")
    with pytest.raises(BadInputError) as info:
        tn3k.convert(str(src), str(tmp_path / "out"))
    got = {b.file: b.reason for b in info.value.offenders}
    assert got == {
        "test-mask/0001.jpg": "mask file does not exist",
        "trainval-mask/0002.jpg": "empty mask: every pixel is 0",
    }
    assert not (tmp_path / "out").exists()
    m = tn3k.convert(str(src), str(tmp_path / "out"), skip_bad=True)
    assert m["n_records"] == 10 - 2 and len(m["skipped"]) == 2
    # fold numbers are image numbers: 99 names no image -> bad input naming the fold file
    (src / "tn3k-trainval-fold0.json").write_text(json.dumps({"train": [0, 1, 99], "val": [2]}))
    with pytest.raises(BadInputError) as info:
        tn3k.convert(str(src), str(tmp_path / "out2"))
    reasons = [b.reason for b in info.value.offenders if b.file == "tn3k-trainval-fold0.json"]
    assert reasons == [
        "'train' lists image 99 but trainval-image/ has no image numbered 99 (e.g. 0099.jpg)"
    ]
    # structural problems of the fold file are fatal even with --skip-bad
    (src / "tn3k-trainval-fold0.json").write_text(json.dumps({"train": [0, 1], "val": [1, -3]}))
    with pytest.raises(BadInputError) as info:
        tn3k.convert(str(src), str(tmp_path / "out2"), skip_bad=True)
    text = str(info.value)
    assert "tn3k-trainval-fold0.json: 'val' has negative image numbers [-3]" in text
    assert info.value.fatal and not (tmp_path / "out2").exists()
    (src / "tn3k-trainval-fold0.json").write_text(json.dumps({"train": [0, 1], "val": [1]}))
    with pytest.raises(BadInputError, match=r"image numbers in both train and val: \[1\]"):
        tn3k.convert(str(src), str(tmp_path / "out2"), skip_bad=True)


def test_heel_bad_rows(raw, tmp_path):
    src = _copy(raw, "heel", tmp_path)
    rows = [json.loads(x) for x in (src / "annotations.jsonl").read_text().splitlines()]
    rows[1]["bbox"] = [10, 10, 200, 50]  # outside the 112x112 image
    rows[2]["bbox"] = [10, 10, 5]  # malformed
    del rows[3]["image"]  # row without an image
    rows[4]["image"] = "images/missing.png"
    rows.append({"image": "images/heel_00005.png", "bbox": [1, 2, 3, 4], "mask": "m.png"})
    (src / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    with pytest.raises(BadInputError) as info:
        heel.convert(str(src), str(tmp_path / "out"))
    got = {b.file: b.reason for b in info.value.offenders}
    assert "reaches outside the 112x112 image" in got["annotations.jsonl:2"]
    assert "bbox must be [x1, y1, x2, y2]" in got["annotations.jsonl:3"]
    assert got["annotations.jsonl:4"] == "annotation row without an image"
    assert got["images/missing.png"] == "image does not exist (named on annotations.jsonl:5)"
    # the accepted forms are named, and what the row has (issue 20, finding 10)
    assert got["annotations.jsonl:7"].startswith("row needs exactly one of a box or a mask: "
                                                 "columns x1,y1,x2,y2, or one 'bbox' cell")
    assert got["annotations.jsonl:7"].endswith("this row has ['bbox', 'image', 'mask']")
    assert got["annotations.jsonl:8"].startswith("not valid JSON")
    assert len(got) == 6 and not (tmp_path / "out").exists()
    m = heel.convert(str(src), str(tmp_path / "out"), skip_bad=True)
    assert m["n_records"] == 6 - 4  # rows 1 and 6 survive


def test_one_line_per_kind_of_problem_and_no_skip_bad_when_every_row_is_bad(tmp_path):
    # Issue 20, finding 10: a CSV with xmin/ymin/xmax/ymax printed 30 identical lines and
    # suggested --skip-bad, which would have dropped every row.
    from data_prep.heel import main

    src = tmp_path / "heel"
    src.mkdir()
    rows = "".join(f"img{i}.png,1,2,30,40\n" for i in range(30))
    (src / "annotations.csv").write_text("image,xmin,ymin,xmax,ymax\n" + rows)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["--src", str(src), "--out", str(tmp_path / "out")]) == 2
    text = err.getvalue()
    assert "heel: 30 bad input(s) of 30 checked, 1 kind(s) of problem" in text
    assert text.count("row needs exactly one of") == 1
    assert "30 x row needs exactly one of a box or a mask" in text
    assert "(annotations.csv:2, annotations.csv:3, annotations.csv:4 and 27 more)" in text
    assert "this row has ['image', 'xmax', 'xmin', 'ymax', 'ymin']" in text
    assert "Every sample is bad" in text and "pass --skip-bad" not in text
    assert not (tmp_path / "out").exists()


def test_help_describes_the_layout_each_converter_reads(capsys):
    import pytest

    from data_prep import ham10000, heel, tn3k

    for module, words in [(heel, "image,x1,y1,x2,y2"), (ham10000, "HAM10000_metadata.csv"),
                          (tn3k, "What --src must hold")]:
        with pytest.raises(SystemExit):
            module.main(["--help"])
        out = capsys.readouterr().out
        assert "What --src must hold" in out and words in out, module.__name__
