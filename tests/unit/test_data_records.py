"""Unit tests for medloc.data.records: the unified grounding record (docs/method.md §7), field
validation with line-numbered errors, JSONL round trip and atomic writing."""

from __future__ import annotations

import json
import os

import pytest

from medloc.data.records import GroundingRecord, RecordError, read_records, write_records


def _rec(**over):
    base = {
        "id": "a1",
        "image": "../raw/a1.jpg",
        "height": 450,
        "width": 600,
        "query": "the skin lesion",
        "box": [10.0, 20.0, 110.0, 220.0],
        "dataset": "ham10000",
        "split": "train",
        "provenance": {"lesion_id": "HAM_0000001"},
    }
    base.update(over)
    return base


def test_round_trip(tmp_path):
    recs = [GroundingRecord(**_rec()), GroundingRecord(**_rec(id="a2", box=[0, 0, 600, 450]))]
    path = tmp_path / "train.jsonl"
    write_records(path, recs)
    back = read_records(path)
    assert back == recs
    assert back[1].box == [0.0, 0.0, 600.0, 450.0]  # ints become floats
    assert isinstance(back[1].box[0], float)
    assert os.listdir(tmp_path) == ["train.jsonl"]  # no temp file left
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == [
        "id",
        "image",
        "height",
        "width",
        "query",
        "box",
        "dataset",
        "split",
        "provenance",
    ]


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"box": [10, 20, 10, 30]}, "x1 < x2"),  # zero width
        ({"box": [0, 0, 601, 10]}, "outside the image"),  # x2 > width=600
        ({"box": [-1, 0, 5, 10]}, "outside the image"),
        ({"box": [0, 0, 5]}, "4 numbers"),
        ({"box": [0, 0, True, 5]}, "4 numbers"),
        ({"height": 0}, "'height'"),
        ({"width": 600.0}, "'width'"),
        ({"width": True}, "'width'"),
        ({"split": "valid"}, "'split'"),
        ({"query": " "}, "'query'"),
        ({"provenance": []}, "'provenance'"),
    ],
)
def test_invalid_fields_are_rejected(over, needle):
    with pytest.raises(RecordError, match=needle):
        GroundingRecord(**_rec(**over))


def test_read_records_reports_every_bad_line_with_its_number(tmp_path):
    good = json.dumps(_rec())
    lines = [
        good,  # line 1 ok
        "{not json",  # line 2
        json.dumps(_rec(id="b", split="dev")),  # line 3
        "",  # line 4 blank: ignored
        json.dumps({k: v for k, v in _rec(id="c").items() if k != "box"}),  # line 5 missing box
        json.dumps(_rec(id="d", extra=1)),  # line 6 unknown field
        good,  # line 7 duplicate id a1
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError) as info:
        read_records(path)
    msg = str(info.value)
    assert "5 invalid record line(s)" in msg
    assert f"{path}:2: not valid JSON" in msg
    assert f"{path}:3: field 'split'" in msg
    assert f"{path}:5: missing field(s) ['box']" in msg
    assert f"{path}:6: unknown field(s) ['extra']" in msg
    assert f"{path}:7: field 'id': duplicate id 'a1' (first seen on line 1)" in msg


def test_missing_file_and_duplicate_write(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    rec = GroundingRecord(**_rec())
    with pytest.raises(RecordError, match="duplicate id 'a1'"):
        write_records(tmp_path / "x.jsonl", [rec, rec])
    assert not (tmp_path / "x.jsonl").exists()


def test_provenance_is_optional():
    obj = _rec()
    del obj["provenance"]
    assert GroundingRecord.from_dict(obj).provenance == {}
