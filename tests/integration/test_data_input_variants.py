"""Integration: the converters on the variants real users' files come in (issue 10, part 2).

Every case ends in either the right box or ONE clear error naming the file (and what was
expected), with nothing written: palette and RGBA masks, full-frame (inverted) masks, extra files
in TN3K folders, cp1252 CSVs, BOMs, upper-case suffixes, empty sources, ``--out`` naming a file,
TN3K test masks without an image."""

from __future__ import annotations

import codecs
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import coco, ham10000, heel, tn3k
from data_prep.bad_input import BadInputError, ConverterWarning
from data_prep.phantoms import make_phantom
from medloc.data import read_records

SIZE = 112  # phantom images are 112x112

# A lesion at rows 30..59, cols 20..69 (inclusive) -> box [20, 30, 70, 60].
LESION = (slice(30, 60), slice(20, 70))
LESION_BOX = [20.0, 30.0, 70.0, 60.0]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    make_phantom("ham10000", root / "ham10000", n_images=6, images_per_lesion=(1, 1), seed=21)
    make_phantom("tn3k", root / "tn3k", n_images=15, test_frac=0.2, seed=22)
    make_phantom("heel", root / "heel", n_images=6, seed=23)
    make_phantom("heel", root / "heel_csv", n_images=6, seed=23, heel_format="csv")
    make_phantom("heel", root / "heel_mask", n_images=6, seed=23, heel_annotation="mask")
    return root


def _copy(raw, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(raw / name, dst)
    return dst


def _records(out) -> dict[str, object]:
    return {
        r.id: r
        for split in ("train", "val", "test")
        for r in read_records(os.path.join(out, f"{split}.jsonl"))
    }


def _offenders(exc_info) -> dict[str, str]:
    return {b.file: b.reason for b in exc_info.value.offenders}


def _lesion_mask(fg=255, bg=0) -> np.ndarray:
    mask = np.full((SIZE, SIZE), bg, np.uint8)
    mask[LESION] = fg
    return mask


HAM_ID = "ISIC_0024306"
HAM_MASK = f"{HAM_ID}_segmentation.png"


def _ham_convert(src, out, **kw):
    ham10000.convert(str(src), str(out), **kw)
    return _records(out)[HAM_ID]


# ----------------------------------------------------------------------------- palette masks


def test_palette_mask_is_read_as_colours_not_indices(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    # index 200 = black background, index 10 = white lesion: read as indices the background
    # (200 > 127) would be the foreground and the box the whole image
    pal = Image.fromarray(_lesion_mask(fg=10, bg=200), mode="L").convert("P")
    palette = [0] * 768
    palette[10 * 3 : 10 * 3 + 3] = [255, 255, 255]
    pal.putpalette(palette)
    pal.save(src / HAM_MASK)
    assert Image.open(src / HAM_MASK).mode == "P"
    rec = _ham_convert(src, tmp_path / "out")
    assert rec.box == LESION_BOX
    # a 0/1-index palette mask (0 -> black, 1 -> red) needs no threshold change either
    pal = Image.fromarray(_lesion_mask(fg=1, bg=0), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.save(src / HAM_MASK)
    assert _ham_convert(src, tmp_path / "out2").box == LESION_BOX


def test_empty_mask_suggests_a_threshold_only_when_it_gives_a_real_box(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    # 0/1 grey mask: "--mask-threshold 0" is the right advice, and it gives the right box
    Image.fromarray(_lesion_mask(fg=1, bg=0)).save(src / HAM_MASK)
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "out"))
    reason = _offenders(info)[HAM_MASK]
    assert "pass --mask-threshold 0" in reason and "(a 0/1 mask)" in reason
    assert _ham_convert(src, tmp_path / "out", mask_threshold=0).box == LESION_BOX
    # a palette whose colours are all dark (index 1 -> (1,1,1) background, index 2 -> (60,60,60)
    # lesion): threshold 0 would make the whole image foreground; the advice is threshold 1
    pal = Image.fromarray(_lesion_mask(fg=2, bg=1), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 1, 1, 1, 60, 60, 60] + [0] * 759)
    pal.save(src / HAM_MASK)
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "out2"))
    reason = _offenders(info)[HAM_MASK]
    assert "--mask-threshold 0" not in reason and "pass --mask-threshold 1" in reason
    assert _ham_convert(src, tmp_path / "out2", mask_threshold=1).box == LESION_BOX
    # every value nonzero but the lesion is the DARK part: lowering the threshold cannot help
    Image.fromarray(_lesion_mask(fg=5, bg=100)).save(src / HAM_MASK)
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "out3"))
    reason = _offenders(info)[HAM_MASK]
    assert "lowering --mask-threshold would not help" in reason and "looks inverted" in reason
    assert "pass --mask-threshold" not in reason
    # an all-zero mask says so
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(src / HAM_MASK)
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "out4"))
    assert _offenders(info)[HAM_MASK] == "empty mask: every pixel is 0"
    assert not any((tmp_path / o).exists() for o in ("out3", "out4"))


# ----------------------------------------------------------------------------- full-frame masks


def test_inverted_mask_is_an_error_unless_allowed(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    Image.fromarray(_lesion_mask(fg=0, bg=255)).save(src / HAM_MASK)  # lesion 0, skin 255
    out = tmp_path / "out"
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(out))
    reason = _offenders(info)[HAM_MASK]
    # 112*112 = 12544 px, lesion 30*50 = 1500 -> foreground (12544-1500)/12544 = 88.0%
    assert reason.startswith("full-frame mask: foreground fills the whole image border")
    assert "(88.0% foreground)" in reason and "--allow-full-frame-mask" in reason
    assert f"[0.0, 0.0, {SIZE}.0, {SIZE}.0]" in reason
    assert not out.exists()
    rec = _ham_convert(src, out, allow_full_frame_mask=True)
    assert rec.box == [0.0, 0.0, float(SIZE), float(SIZE)]  # what the user said is meant
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["allow_full_frame_mask"] is True


def test_mask_covering_almost_the_frame_and_the_fraction_option(raw, tmp_path, capsys):
    src = _copy(raw, "ham10000", tmp_path)
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    mask[:10, :10] = 0  # background only in a corner: 100 px -> 12444/12544 = 99.2% foreground
    Image.fromarray(mask).save(src / HAM_MASK)
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "out"))
    assert (
        "foreground covers 99.2% of the image, more than the max_mask_fraction 0.95"
        in _offenders(info)[HAM_MASK]
    )
    # the CLI: the same error, exit 2; a higher --max-mask-fraction accepts it
    args = ["--src", str(src), "--out", str(tmp_path / "cli")]
    assert ham10000.main(args) == 2
    assert "max_mask_fraction 0.95" in capsys.readouterr().err
    assert ham10000.main(args + ["--max-mask-fraction", "0.995"]) == 0
    assert _records(tmp_path / "cli")[HAM_ID].box == [0.0, 0.0, float(SIZE), float(SIZE)]
    assert ham10000.main(args + ["--allow-full-frame-mask"]) == 0
    with pytest.raises(ValueError, match="max_mask_fraction"):
        ham10000.convert(str(src), str(tmp_path / "x"), max_mask_fraction=0.0)


def test_rgba_masks(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    # 1. the lesion only in alpha, colour constant white: alpha decides -> the right box
    rgba[:, :, :3] = 255
    rgba[:, :, 3] = _lesion_mask()
    Image.fromarray(rgba, mode="RGBA").save(src / HAM_MASK)
    rec = _ham_convert(src, tmp_path / "a")
    assert rec.box == LESION_BOX and rec.provenance["mask_channel"] == "alpha"
    # 2. constant black colour, lesion in alpha: the same
    rgba[:, :, :3] = 0
    Image.fromarray(rgba, mode="RGBA").save(src / HAM_MASK)
    assert _ham_convert(src, tmp_path / "b").box == LESION_BOX
    # 3. transparent white background, opaque red lesion: colour x alpha (what it shows on black)
    rgba[:, :, :3] = 255
    rgba[LESION[0], LESION[1], 1:3] = 0
    Image.fromarray(rgba, mode="RGBA").save(src / HAM_MASK)
    rec = _ham_convert(src, tmp_path / "c")
    assert rec.box == LESION_BOX and rec.provenance["mask_channel"] == "colour*alpha"
    # 4. opaque everywhere: alpha is ignored, the colour decides (no provenance note)
    rgba[:, :, :3] = 0
    rgba[:, :, 3] = 255
    rgba[LESION[0], LESION[1], :3] = 255
    Image.fromarray(rgba, mode="RGBA").save(src / HAM_MASK)
    rec = _ham_convert(src, tmp_path / "d")
    assert rec.box == LESION_BOX and "mask_channel" not in rec.provenance
    # 5. the lesion transparent in an opaque frame (alpha inverted): a full-frame error
    rgba[:, :, :3] = 255
    rgba[:, :, 3] = _lesion_mask(fg=0, bg=255)
    Image.fromarray(rgba, mode="RGBA").save(src / HAM_MASK)
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "e"))
    assert _offenders(info)[HAM_MASK].startswith("full-frame mask (read from alpha): ")


# ----------------------------------------------------------------------------- TN3K folds


def _val_ids(out) -> list[str]:
    return sorted(rid for rid, r in _records(out).items() if r.split == "val")


def test_tn3k_folds_follow_image_numbers_not_folder_positions(raw, tmp_path, capsys):
    good = tmp_path / "good"
    tn3k.convert(str(raw / "tn3k"), str(good))
    src = _copy(raw, "tn3k", tmp_path)
    # "0001 - Copy.jpg" sorts between 0001.jpg and 0002.jpg: by position it would shift the folds
    shutil.copy(src / "trainval-image" / "0001.jpg", src / "trainval-image" / "0001 - Copy.jpg")
    shutil.copy(src / "trainval-mask" / "0001.jpg", src / "trainval-mask" / "0001 - Copy.jpg")
    out = tmp_path / "out"
    with pytest.warns(ConverterWarning, match=r"trainval-image/: 1 file\(s\) whose name is not"):
        m = tn3k.convert(str(src), str(out))
    assert _val_ids(out) == _val_ids(good)
    fold = json.loads((src / "tn3k-trainval-fold0.json").read_text())
    assert sorted(r.provenance["index"] for r in _records(out).values() if r.split == "val") == (
        sorted(fold["val"])
    )
    assert {rid: r.box for rid, r in _records(out).items()} == {
        rid: r.box for rid, r in _records(good).items()
    }
    assert [w["file"] for w in m["warnings"]] == ["trainval-image/", "trainval-mask/"]
    assert all("0001 - Copy.jpg" in w["reason"] for w in m["warnings"])
    # the CLI prints the warning to stderr and still succeeds
    assert tn3k.main(["--src", str(src), "--out", str(tmp_path / "cli")]) == 0
    captured = capsys.readouterr()
    assert "warning: tn3k: 2 warning(s)" in captured.err and "0001 - Copy.jpg" in captured.err
    assert "2 warning(s)" in captured.out


def test_tn3k_a_missing_image_moves_no_other_image(raw, tmp_path):
    good = tmp_path / "good"
    tn3k.convert(str(raw / "tn3k"), str(good))
    src = _copy(raw, "tn3k", tmp_path)
    os.remove(src / "trainval-image" / "0000.jpg")  # by position every later image would shift
    with pytest.raises(BadInputError) as info:
        tn3k.convert(str(src), str(tmp_path / "out"))
    (reason,) = _offenders(info).values()
    assert "lists image 0 but trainval-image/ has no image numbered 0 (e.g. 0000.jpg)" in reason
    with pytest.warns(ConverterWarning, match="1 mask.s. without a trainval image.*: 0000.jpg"):
        tn3k.convert(str(src), str(tmp_path / "out"), skip_bad=True)
    survivors = _records(tmp_path / "out")
    before = _records(good)
    assert set(before) - set(survivors) == {"trainval/0000"}
    assert all(before[rid].split == r.split for rid, r in survivors.items())


def test_tn3k_test_mask_without_image_is_reported(raw, tmp_path):
    src = _copy(raw, "tn3k", tmp_path)
    os.remove(src / "test-image" / "0001.jpg")
    with pytest.raises(BadInputError) as info:
        tn3k.convert(str(src), str(tmp_path / "out"))
    assert _offenders(info) == {
        "test-mask/0001.jpg": "test mask without an image: no test-image/ file numbered 1; the "
        "official test set would lose this sample"
    }
    assert not (tmp_path / "out").exists()
    m = tn3k.convert(str(src), str(tmp_path / "out"), skip_bad=True)
    assert [s["file"] for s in m["skipped"]] == ["test-mask/0001.jpg"]
    assert m["counts"]["test"] == 3 - 1


# ----------------------------------------------------------------------------- encodings


def test_cp1252_csv_is_decoded_with_a_warning(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    csv_path = src / "HAM10000_metadata.csv"
    lines = csv_path.read_text(encoding="utf-8").splitlines()
    cells = lines[1].split(",")
    cells[-1] = "épaule – côté"  # é, en dash, ô: all cp1252, none valid UTF-8 once encoded
    lines[1] = ",".join(cells)
    csv_path.write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    with pytest.warns(ConverterWarning, match=r"not UTF-8 \(byte 0xe9 at offset \d+, line 2\)"):
        m = ham10000.convert(str(src), str(tmp_path / "out"))
    assert _records(tmp_path / "out")[HAM_ID].provenance["localization"] == "épaule – côté"
    assert m["warnings"][0]["file"] == "HAM10000_metadata.csv"
    assert "read as cp1252" in m["warnings"][0]["reason"]
    # bytes that are neither UTF-8 nor cp1252 (0x81 is undefined in cp1252): one clear error
    csv_path.write_bytes(csv_path.read_bytes().replace(b"\xe9", b"\x81"))
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "out2"))
    assert info.value.fatal
    assert "neither UTF-8 (byte 0x81" in _offenders(info)["HAM10000_metadata.csv"]
    assert not (tmp_path / "out2").exists()


def test_heel_cp1252_csv_and_utf16_csv(raw, tmp_path):
    src = _copy(raw, "heel_csv", tmp_path)
    ann = src / "annotations.csv"
    lines = ann.read_text(encoding="utf-8").splitlines()
    lines[0] += ",query"
    lines[1] += ",the calcanéus"
    for i in range(2, len(lines)):
        lines[i] += ","
    ann.write_bytes(("\n".join(lines) + "\n").encode("cp1252"))
    with pytest.warns(ConverterWarning, match="read as cp1252"):
        heel.convert(str(src), str(tmp_path / "out"))
    queries = {r.query for r in _records(tmp_path / "out").values()}
    assert "the calcanéus" in queries
    ann.write_bytes(codecs.BOM_UTF16_LE + ("\n".join(lines) + "\n").encode("utf-16-le"))
    heel.convert(str(src), str(tmp_path / "out16"))  # Excel's "Unicode text": no warning
    assert _records(tmp_path / "out16") == _records(tmp_path / "out")


def test_json_with_a_bom_is_accepted_like_csv(raw, tmp_path):
    src = _copy(raw, "heel", tmp_path)
    tn = _copy(raw, "tn3k", tmp_path)
    heel.convert(str(src), str(tmp_path / "plain"))
    tn3k.convert(str(tn), str(tmp_path / "tn_plain"))
    ann = src / "annotations.jsonl"
    ann.write_bytes(codecs.BOM_UTF8 + ann.read_bytes())
    fold = tn / "tn3k-trainval-fold0.json"
    fold.write_bytes(codecs.BOM_UTF8 + fold.read_bytes())
    heel.convert(str(src), str(tmp_path / "bom"))
    tn3k.convert(str(tn), str(tmp_path / "tn_bom"))
    assert _records(tmp_path / "bom") == _records(tmp_path / "plain")
    assert _records(tmp_path / "tn_bom") == _records(tmp_path / "tn_plain")
    # JSON that is not UTF-8: one fatal error naming the byte
    ann.write_bytes(
        '{"image": "images/heel_00000.png", "query": "é", "bbox": [1, 2, 3, 4]}\n'.encode("latin-1")
    )
    with pytest.raises(BadInputError) as info:
        heel.convert(str(src), str(tmp_path / "latin"))
    assert info.value.fatal
    assert "not UTF-8 (byte 0xe9 at offset 45, line 1); JSON must be UTF-8" in str(info.value)


# ----------------------------------------------------------------------------- file names


def test_upper_and_mixed_case_suffixes_are_found(raw, tmp_path):
    good = tmp_path / "good"
    ham10000.convert(str(raw / "ham10000"), str(good))
    src = _copy(raw, "ham10000", tmp_path)
    os.rename(src / "ISIC_0024306.jpg", src / "ISIC_0024306.JPG")
    os.rename(src / "ISIC_0024307.jpg", src / "ISIC_0024307.Jpg")
    os.rename(src / "ISIC_0024306_segmentation.png", src / "ISIC_0024306_segmentation.PNG")
    ham10000.convert(str(src), str(tmp_path / "ham"))
    recs = _records(tmp_path / "ham")
    assert {k: r.box for k, r in recs.items()} == {k: r.box for k, r in _records(good).items()}
    assert recs["ISIC_0024306"].image.endswith("ISIC_0024306.JPG")
    assert recs["ISIC_0024306"].provenance["mask"].endswith("ISIC_0024306_segmentation.PNG")
    # both cases present: ambiguous, reported, never picked from
    shutil.copy(src / "ISIC_0024307.Jpg", src / "ISIC_0024307.jpg")
    with pytest.raises(BadInputError) as info:
        ham10000.convert(str(src), str(tmp_path / "ham2"))
    assert "found more than once: ISIC_0024307.Jpg, ISIC_0024307.jpg" in str(info.value)

    # HEEL: the annotation names images/heel_00000.png, the disk holds .PNG
    hs = _copy(raw, "heel", tmp_path)
    heel.convert(str(hs), str(tmp_path / "heel_good"))
    os.rename(hs / "images" / "heel_00000.png", hs / "images" / "heel_00000.PNG")
    heel.convert(str(hs), str(tmp_path / "heel"))
    h_recs = _records(tmp_path / "heel")
    assert {k: r.box for k, r in h_recs.items()} == {
        k: r.box for k, r in _records(tmp_path / "heel_good").items()
    }
    assert h_recs["images/heel_00000"].image.endswith("heel_00000.PNG")
    # two files that differ only in the suffix's case, neither as named: ambiguous, reported
    os.rename(hs / "images" / "heel_00001.png", hs / "images" / "heel_00001.Png")
    shutil.copy(hs / "images" / "heel_00001.Png", hs / "images" / "heel_00001.PNG")
    with pytest.raises(BadInputError) as info:
        heel.convert(str(hs), str(tmp_path / "heel2"))
    assert (
        "several files differ only in the suffix's case: images/heel_00001.PNG, "
        in (_offenders(info)["images/heel_00001.png"])
    )
    # HEEL masks: masks/heel_00002.png on disk as .PNG
    hm = _copy(raw, "heel_mask", tmp_path)
    heel.convert(str(hm), str(tmp_path / "hm_good"))
    os.rename(hm / "masks" / "heel_00002.png", hm / "masks" / "heel_00002.PNG")
    heel.convert(str(hm), str(tmp_path / "hm"))
    assert _records(tmp_path / "hm") != _records(tmp_path / "hm_good")  # the mask path differs
    assert {k: r.box for k, r in _records(tmp_path / "hm").items()} == {
        k: r.box for k, r in _records(tmp_path / "hm_good").items()
    }

    # TN3K: image .JPG and mask .Jpg are found (images and masks alike)
    ts = _copy(raw, "tn3k", tmp_path)
    tn3k.convert(str(ts), str(tmp_path / "tn_good"))
    os.rename(ts / "test-image" / "0002.jpg", ts / "test-image" / "0002.JPG")
    os.rename(ts / "test-mask" / "0002.jpg", ts / "test-mask" / "0002.Jpg")
    os.rename(ts / "trainval-mask" / "0003.jpg", ts / "trainval-mask" / "0003.PNG")
    tn3k.convert(str(ts), str(tmp_path / "tn"))
    t_recs = _records(tmp_path / "tn")
    assert {k: r.box for k, r in t_recs.items()} == {
        k: r.box for k, r in _records(tmp_path / "tn_good").items()
    }
    assert t_recs["test/0002"].provenance["mask"].endswith("test-mask/0002.Jpg")


# ----------------------------------------------------------------------------- empty sources


def _fatal(fn, *args, **kwargs) -> str:
    with pytest.raises(BadInputError) as info:
        fn(*args, **kwargs)
    assert info.value.fatal
    return str(info.value)


def test_empty_sources_are_errors_not_zero_records(raw, tmp_path):
    src = _copy(raw, "ham10000", tmp_path)
    out = tmp_path / "out"
    meta = src / "HAM10000_metadata.csv"
    header = meta.read_text().splitlines()[0]
    meta.write_text(header + "\n")
    assert "HAM10000_metadata.csv: the metadata CSV has a header but no data row" in _fatal(
        ham10000.convert, str(src), str(out), skip_bad=True
    )
    meta.write_text("")
    assert "HAM10000_metadata.csv: the metadata CSV is empty" in _fatal(
        ham10000.convert, str(src), str(out)
    )
    # rows but no image at all: every row is bad; skipping them all leaves nothing -> an error
    shutil.copy(raw / "ham10000" / "HAM10000_metadata.csv", meta)
    for f in src.glob("*.jpg"):
        f.unlink()
    text = _fatal(ham10000.convert, str(src), str(out), skip_bad=True)
    assert "no record left: all 6 bad sample(s) were skipped" in text

    hs = _copy(raw, "heel", tmp_path)
    (hs / "annotations.jsonl").write_text("\n\n")
    assert "annotations.jsonl: the annotation file is empty (no JSON line)" in _fatal(
        heel.convert, str(hs), str(out)
    )
    hc = _copy(raw, "heel_csv", tmp_path)
    (hc / "annotations.csv").write_text("image,x1,y1,x2,y2\n")
    assert "annotations.csv: the annotation CSV has a header but no data row" in _fatal(
        heel.convert, str(hc), str(out)
    )

    ts = _copy(raw, "tn3k", tmp_path)
    for f in (ts / "test-image").iterdir():
        f.unlink()
    assert "test-image/: holds no numbered image (NNNN.jpg)" in _fatal(
        tn3k.convert, str(ts), str(out), skip_bad=True
    )
    assert not out.exists()


# ----------------------------------------------------------------------------- --out


def test_out_naming_an_existing_file_is_a_clear_error(raw, tmp_path, capsys):
    target = tmp_path / "out.jsonl"
    target.write_text("keep me\n")
    for mod, name in ((ham10000, "ham10000"), (tn3k, "tn3k"), (heel, "heel")):
        text = _fatal(mod.convert, str(raw / name), str(target))
        assert f"{target}: --out names an existing file; it must be a folder" in text
        assert mod.main(["--src", str(raw / name), "--out", str(target)]) == 2
        assert "--out names an existing file" in capsys.readouterr().err
    # a path below a file cannot be created either
    assert "is a file, not a folder" in _fatal(tn3k.convert, str(raw / "tn3k"), str(target / "sub"))
    assert target.read_text() == "keep me\n"
    # COCO export: --out naming a folder, and an empty split
    tn3k.convert(str(raw / "tn3k"), str(tmp_path / "tn"))
    assert coco.main(["--jsonl", str(tmp_path / "tn" / "test.jsonl"), "--out", str(tmp_path)]) == 2
    assert "--out names a folder" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert coco.main(["--jsonl", str(tmp_path / "empty.jsonl")]) == 2
    assert "holds no record; nothing to export" in capsys.readouterr().err
    assert not (tmp_path / "empty_coco.json").exists()
