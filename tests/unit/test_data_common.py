"""Unit tests for data_prep.common, data_prep.masks and data_prep.bad_input: the mask -> box pixel
convention, union vs largest rules, 8-connectivity, binarisation (incl. lossy JPEG masks), how
palette/alpha masks are read, the full-frame check, text decoding, suffix-case lookup, seeded group
splits, hashing and all-or-nothing writing."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from data_prep.bad_input import BadInput, BadInputError, check_bad_inputs, check_out_dir
from data_prep.common import (
    SuffixCaseResolver,
    check_fractions,
    read_text,
    sha256_file,
    split_groups,
)
from data_prep.masks import (
    EmptyMaskError,
    binarize_mask,
    connected_components,
    load_mask,
    mask_coverage_problem,
    mask_to_box,
    mask_values,
    read_mask,
)
from medloc.atomic import atomic_write_files


def test_rectangle_mask_gives_exclusive_end_box():
    # Foreground columns 4..6 and rows 10..11 (inclusive) -> [x0, y0, x1+1, y1+1] = [4, 10, 7, 12];
    # area (7-4)*(12-10) = 6 = the 3x2 pixel count.
    mask = np.zeros((20, 30), dtype=bool)
    mask[10:12, 4:7] = True
    result = mask_to_box(mask)
    assert result.box == [4.0, 10.0, 7.0, 12.0]
    assert result.n_components == 1
    x1, y1, x2, y2 = result.box
    assert (x2 - x1) * (y2 - y1) == mask.sum() == 6


def test_single_pixel_and_full_mask():
    one = np.zeros((5, 8), dtype=bool)
    one[0, 0] = True  # pixel (col 0, row 0) covers [0, 1) x [0, 1)
    assert mask_to_box(one).box == [0.0, 0.0, 1.0, 1.0]
    full = np.ones((5, 8), dtype=bool)  # H=5, W=8 -> the whole image [0, 0, 8, 5]
    assert mask_to_box(full).box == [0.0, 0.0, 8.0, 5.0]


def _two_blobs() -> np.ndarray:
    mask = np.zeros((20, 32), dtype=bool)
    mask[2:5, 1:4] = True  # A: rows 2..4, cols 1..3 -> 3*3 = 9 px, box [1, 2, 4, 5]
    mask[10:16, 20:28] = True  # B: rows 10..15, cols 20..27 -> 6*8 = 48 px, box [20, 10, 28, 16]
    return mask


def test_union_vs_largest_on_two_components():
    mask = _two_blobs()
    union = mask_to_box(mask, "union")
    largest = mask_to_box(mask, "largest")
    assert union.n_components == largest.n_components == 2
    assert union.box == [1.0, 2.0, 28.0, 16.0]  # min col 1, min row 2, max col 27+1, max row 15+1
    assert largest.box == [20.0, 10.0, 28.0, 16.0]  # B has 48 px > A's 9 px


def test_largest_tie_goes_to_first_in_raster_order():
    mask = np.zeros((10, 10), dtype=bool)
    mask[6:8, 0:2] = True  # 4 px, starts on row 6
    mask[1:3, 7:9] = True  # 4 px, starts on row 1 -> first in raster order (label 1)
    assert mask_to_box(mask, "largest").box == [7.0, 1.0, 9.0, 3.0]


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # touch only at corners
    _, count = connected_components(mask)
    assert count == 1  # 8-connectivity
    mask[2, 2] = False
    mask[3, 3] = False
    mask[0, 3] = True  # far from (0,0)/(1,1): a second component
    assert connected_components(mask)[1] == 2


def test_empty_mask_and_bad_rule():
    with pytest.raises(EmptyMaskError):
        mask_to_box(np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"'biggest'.*\['union', 'largest'\]"):
        mask_to_box(np.ones((2, 2), dtype=bool), "biggest")  # type: ignore[arg-type]


def test_binarize_threshold_and_colour_masks():
    gray = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert binarize_mask(gray).tolist() == [[False, False, True, True]]  # strictly > 127
    assert binarize_mask(gray, threshold=0).tolist() == [[False, True, True, True]]
    rgb = np.zeros((1, 2, 3), dtype=np.uint8)
    rgb[0, 1, 2] = 200  # foreground in the blue channel only counts (max over channels)
    assert binarize_mask(rgb).tolist() == [[False, True]]


def test_jpeg_mask_is_lossy_but_binarises_to_the_drawn_rectangle(tmp_path):
    mask = np.zeros((45, 61), dtype=np.uint8)
    mask[13:31, 9:40] = 255  # rows 13..30, cols 9..39 -> box [9, 13, 40, 31]
    path = tmp_path / "0001.jpg"
    Image.fromarray(mask).save(path, format="JPEG", quality=75)
    decoded = np.asarray(Image.open(path))
    assert ((decoded > 0) & (decoded < 255)).any()  # really lossy: values between 0 and 255
    assert mask_to_box(load_mask(str(path))).box == [9.0, 13.0, 40.0, 31.0]


def test_split_groups_counts_and_determinism():
    groups = [f"L{i:02d}" for i in range(20)] * 3  # 20 distinct groups, each 3 times
    a = split_groups(groups, (0.7, 0.1, 0.2), seed=0)
    # 20 groups: test floor(20*0.2+0.5) = 4, val floor(20*0.1+0.5) = 2, train 20-4-2 = 14
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 2, "test": 4}
    assert split_groups(list(reversed(groups)), (0.7, 0.1, 0.2), seed=0) == a  # order-free
    assert split_groups(groups, (0.7, 0.1, 0.2), seed=1) != a


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_check_fractions_rejects(bad):
    with pytest.raises(ValueError, match="fractions"):
        check_fractions(bad)


def test_sha256_known_value(tmp_path):
    p = tmp_path / "abc.txt"
    p.write_bytes(b"abc")
    # FIPS 180-2 test vector for "abc"
    assert sha256_file(str(p)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_write_files_atomic_is_all_or_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a folder is needed")
    files = {str(tmp_path / "a.txt"): "new a", str(blocker / "b.txt"): "b"}
    with pytest.raises(OSError):
        atomic_write_files(files)
    assert (tmp_path / "a.txt").read_text() == "old a"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "not_a_dir"]  # no temp file left behind
    atomic_write_files({str(tmp_path / "a.txt"): "new a", str(tmp_path / "c.txt"): "c"})
    assert (tmp_path / "a.txt").read_text() == "new a"
    assert (tmp_path / "c.txt").read_text() == "c"


def test_bad_input_summary_lists_every_offender():
    bad = [BadInput("x/1.jpg", "unreadable image (broken)"), BadInput("x/2.png", "empty mask")]
    check_bad_inputs("demo", bad, skip_bad=True)  # skipping: no raise
    with pytest.raises(BadInputError) as info:
        check_bad_inputs("demo", bad, skip_bad=False)
    text = str(info.value)
    assert "2 bad input(s)" in text and "x/1.jpg: unreadable image" in text
    assert "x/2.png: empty mask" in text and "--skip-bad" in text
    assert info.value.offenders == bad


def test_load_mask_reads_png_bytes_exactly(tmp_path):
    arr = np.zeros((3, 4), dtype=np.uint8)
    arr[1, 2] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    (tmp_path / "m.png").write_bytes(buf.getvalue())
    assert load_mask(str(tmp_path / "m.png")).tolist() == (arr > 127).tolist()


# ----------------------------------------------------------------------------- palette / alpha


def test_palette_png_is_read_through_its_colours(tmp_path):
    idx = np.array([[200, 200, 10, 10]], dtype=np.uint8)  # indices: 200 background, 10 lesion
    img = Image.fromarray(idx, mode="L").convert("P")
    palette = [0] * 768
    palette[30:33] = [255, 255, 255]  # index 10 -> white; index 200 stays black
    img.putpalette(palette)
    img.save(tmp_path / "m.png")
    values, channel = read_mask(str(tmp_path / "m.png"))
    assert values.tolist() == [[0, 0, 255, 255]] and channel == "colour"  # colours, not 200/10
    assert load_mask(str(tmp_path / "m.png")).tolist() == [[False, False, True, True]]


def test_palette_transparency_becomes_alpha(tmp_path):
    idx = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, mode="L").convert("P")
    img.putpalette([255, 255, 255] * 2 + [0] * 762)  # both indices white: colour constant
    img.info["transparency"] = 0  # index 0 transparent -> the lesion is only in alpha
    img.save(tmp_path / "m.png", transparency=0)
    values, channel = read_mask(str(tmp_path / "m.png"))
    assert channel == "alpha" and values.tolist() == [[0, 0, 255, 255]]


def test_mask_values_alpha_rules():
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[0, 2:, 3] = 255  # constant white colour, alpha 0 0 255 255 -> alpha decides
    values, channel = mask_values(rgba)
    assert channel == "alpha" and values.tolist() == [[0, 0, 255, 255]]
    rgba[..., 3] = 255  # constant alpha -> ignored, colour decides (all white here)
    assert mask_values(rgba)[1] == "colour"
    # both vary: colour x alpha / 255. Pixels: white opaque, white half, black opaque, red clear
    rgba = np.array(
        [[[255, 255, 255, 255], [255, 255, 255, 128], [0, 0, 0, 255], [255, 0, 0, 0]]], np.uint8
    )
    values, channel = mask_values(rgba)
    assert channel == "colour*alpha"
    # 255*255/255 = 255; 255*128/255 = 128; 0; 255*0 = 0
    assert values.tolist() == [[255.0, 128.0, 0.0, 0.0]]
    assert binarize_mask(rgba).tolist() == [[True, True, False, False]]
    la = np.zeros((1, 3, 2), np.uint8)  # grey + alpha, grey constant 0, alpha 0 255 0
    la[0, 1, 1] = 255
    assert mask_values(la)[1] == "alpha" and binarize_mask(la).tolist() == [[False, True, False]]


def test_mask_coverage_problem():
    # 10x10 frame with a 2x2 hole inside: border all foreground -> inverted; 96 of 100 = 96.0%
    inverted = np.ones((10, 10), dtype=bool)
    inverted[4:6, 4:6] = False
    assert "looks inverted" in mask_coverage_problem(inverted, 0.99)  # type: ignore[operator]
    # a 3x3 corner missing: 91/100 = 91% foreground, border not all foreground
    corner = np.ones((10, 10), dtype=bool)
    corner[:3, :3] = False
    assert mask_coverage_problem(corner, 0.95) is None  # 0.91 <= 0.95
    assert mask_coverage_problem(corner, 0.90) == (
        "foreground covers 91.0% of the image, more than the max_mask_fraction 0.9"
    )
    assert "covers 100.0%" in mask_coverage_problem(np.ones((4, 4), bool), 0.95)  # type: ignore[operator]
    lesion = np.zeros((10, 10), dtype=bool)
    lesion[2:8, 0:10] = True  # touches left and right borders only
    assert mask_coverage_problem(lesion, 0.95) is None


# ----------------------------------------------------------------------------- text, names, out


def test_read_text_encodings(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes(b"\xef\xbb\xbfimage,x\nd\xc3\xa9j\xc3\xa0,1\n")  # UTF-8 with a BOM
    assert read_text("demo", str(p), "a.csv", kind="csv") == ("image,x\ndéjà,1\n", None)
    p.write_bytes("image,x\ndéjà,1\n".encode("cp1252"))  # Excel on Windows
    text, note = read_text("demo", str(p), "a.csv", kind="csv")
    assert text == "image,x\ndéjà,1\n"
    # "image,x\nd" is 9 bytes, so 0xe9 is at offset 9, on line 2
    assert note is not None and note.file == "a.csv"
    assert note.reason.startswith("not UTF-8 (byte 0xe9 at offset 9, line 2); read as cp1252")
    with pytest.raises(BadInputError, match=r"a.csv: not UTF-8 \(byte 0xe9 at offset 9, line 2\)"):
        read_text("demo", str(p), "a.csv", kind="json")
    p.write_bytes(b"image\n\x81\n")  # 0x81: invalid UTF-8 and undefined in cp1252
    with pytest.raises(BadInputError, match=r"neither UTF-8 .* nor cp1252") as info:
        read_text("demo", str(p), "a.csv", kind="csv")
    assert info.value.fatal


def test_suffix_case_resolver(tmp_path):
    (tmp_path / "a.PNG").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "c.Jpg").write_bytes(b"x")
    (tmp_path / "c.JPG").write_bytes(b"x")
    r = SuffixCaseResolver()
    assert r.resolve(str(tmp_path / "a.png")) == (str(tmp_path / "a.PNG"), [])
    assert r.resolve(str(tmp_path / "b.png")) == (str(tmp_path / "b.png"), [])
    assert r.resolve(str(tmp_path / "A.png")) == (None, [])  # the stem must match exactly
    found, candidates = r.resolve(str(tmp_path / "c.jpg"))
    assert found is None and sorted(candidates) == [
        str(tmp_path / "c.JPG"),
        str(tmp_path / "c.Jpg"),
    ]


def test_check_out_dir(tmp_path):
    check_out_dir("demo", str(tmp_path / "new" / "deeper"))  # creatable: fine
    check_out_dir("demo", str(tmp_path))  # an existing folder: fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInputError, match="--out names an existing file") as info:
        check_out_dir("demo", str(tmp_path / "f"))
    assert info.value.fatal
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        check_out_dir("demo", str(tmp_path / "f" / "sub"))
