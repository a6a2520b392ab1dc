"""The unified grounding record (docs/method.md §7) and its JSONL file format.

One JSON object per line in ``<data_root>/<name>/<split>.jsonl``::

    {"id": "ISIC_0024306", "image": "../raw/ham10000/ISIC_0024306.jpg",
     "height": 450, "width": 600, "query": "the skin lesion",
     "box": [12.0, 30.0, 410.0, 398.0], "dataset": "ham10000", "split": "train",
     "provenance": {"lesion_id": "HAM_0000118", ...}}

- ``image`` is a path relative to the folder that holds the JSONL file (the dataset root). The
  converters in ``data_prep/`` write it with ``os.path.relpath`` so that records point at the
  source images where they already lie; no image is ever copied.
- ``height``/``width`` are the ORIGINAL image size in pixels.
- ``box`` is ``[x1, y1, x2, y2]`` in ORIGINAL-image pixels, continuous convention: pixel column
  ``c`` covers ``[c, c+1)``, so a box's area is ``(x2-x1)*(y2-y1)`` and it must satisfy
  ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``.

``read_records`` validates every field and reports problems as ``path:line: field ...`` so a
broken file is fixed in one go; ``write_records`` writes atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from medloc.atomic import atomic_write_text
from medloc.jsonl import JsonlError, read_jsonl

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = get_args(Split)

# The fields of one JSONL line, in the order they are written.
RECORD_FIELDS: tuple[str, ...] = (
    "id",
    "image",
    "height",
    "width",
    "query",
    "box",
    "dataset",
    "split",
    "provenance",
)


class RecordError(ValueError):
    """A grounding record (or a line of a records file) is invalid; the message says where."""


@dataclass
class GroundingRecord:
    """One grounding sample: an image, a query naming the finding, and its ground-truth box.

    Validated on construction (``RecordError`` naming the field, the value and what was expected).
    ``box`` is stored as a list of 4 floats ``[x1, y1, x2, y2]`` in original-image pixels.
    """

    id: str
    image: str
    height: int
    width: int
    query: str
    box: list[float]
    dataset: str
    split: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("id", "image", "query", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"field {name!r}: expected a non-empty string, got {value!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            # bool is an int subclass; a JSON true/false is not a size.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RecordError(f"field {name!r}: expected a positive integer, got {value!r}")
        if self.split not in SPLITS:
            raise RecordError(f"field 'split': got {self.split!r}, expected one of {list(SPLITS)}")
        if not isinstance(self.provenance, dict):
            raise RecordError(
                f"field 'provenance': expected a JSON object, got {type(self.provenance).__name__}"
            )
        self.box = _validate_box(self.box, width=self.width, height=self.height)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written for this record (fields in ``RECORD_FIELDS`` order)."""
        return {
            "id": self.id,
            "image": self.image,
            "height": self.height,
            "width": self.width,
            "query": self.query,
            "box": list(self.box),
            "dataset": self.dataset,
            "split": self.split,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> GroundingRecord:
        """Build a record from a parsed JSON object; unknown or missing keys are errors."""
        if not isinstance(obj, dict):
            raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in RECORD_FIELDS if k not in obj and k != "provenance"]
        if missing:
            raise RecordError(f"missing field(s) {missing}; a record has {list(RECORD_FIELDS)}")
        unknown = sorted(set(obj) - set(RECORD_FIELDS))
        if unknown:
            raise RecordError(f"unknown field(s) {unknown}; a record has {list(RECORD_FIELDS)}")
        return cls(**{k: obj[k] for k in RECORD_FIELDS if k in obj})


def _validate_box(box: Any, *, width: int, height: int) -> list[float]:
    """Check ``[x1, y1, x2, y2]``: 4 finite numbers, x1 < x2, y1 < y2, inside the image."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise RecordError(f"field 'box': expected [x1, y1, x2, y2] (4 numbers), got {box!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        raise RecordError(f"field 'box': expected 4 numbers, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise RecordError(f"field 'box': expected finite numbers, got {box!r}")
    if not (x1 < x2 and y1 < y2):
        raise RecordError(f"field 'box': expected x1 < x2 and y1 < y2, got {box!r}")
    if not (0.0 <= x1 and x2 <= width and 0.0 <= y1 and y2 <= height):
        raise RecordError(
            f"field 'box': {box!r} lies outside the image "
            f"(expected 0 <= x1 < x2 <= width={width}, 0 <= y1 < y2 <= height={height})"
        )
    return [x1, y1, x2, y2]


def read_records(path: str | os.PathLike[str]) -> list[GroundingRecord]:
    """Read and validate a grounding JSONL file.

    Blank lines are ignored. Every other line must be a valid record; ids must be unique in the
    file. All problems are collected and raised together as one ``RecordError`` whose lines read
    ``<path>:<line>: <problem>``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecordError(f"{path}: records file does not exist")
    records: list[GroundingRecord] = []
    problems: list[str] = []
    first_line_of_id: dict[str, int] = {}
    try:
        rows = read_jsonl(path, bad="keep")
    except JsonlError as exc:  # not UTF-8
        raise RecordError(str(exc)) from None
    for lineno, obj in rows:
        if isinstance(obj, JsonlError):
            problems.append(str(obj))
            continue
        try:
            rec = GroundingRecord.from_dict(obj)
        except (RecordError, TypeError) as exc:
            problems.append(f"{path}:{lineno}: {exc}")
            continue
        if rec.id in first_line_of_id:
            problems.append(
                f"{path}:{lineno}: field 'id': duplicate id {rec.id!r} "
                f"(first seen on line {first_line_of_id[rec.id]})"
            )
            continue
        first_line_of_id[rec.id] = lineno
        records.append(rec)
    if problems:
        raise RecordError(f"{len(problems)} invalid record line(s):\n" + "\n".join(problems))
    return records


def records_to_jsonl(records: list[GroundingRecord]) -> str:
    """Serialise records as JSONL text (one object per line, trailing newline if non-empty)."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in records]
    return "".join(line + "\n" for line in lines)


def write_records(path: str | os.PathLike[str], records: list[GroundingRecord]) -> None:
    """Write records as JSONL atomically (ids must be unique)."""
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            raise RecordError(f"write_records({os.fspath(path)}): duplicate id {rec.id!r}")
        seen.add(rec.id)
    atomic_write_text(path, records_to_jsonl(records))


def with_query(records: list[GroundingRecord], query: str | None) -> list[GroundingRecord]:
    """The records with their question's finding replaced by ``query`` (None: unchanged)."""
    if query is None:
        return records
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"dataset.query must be a non-empty string or null, got {query!r}")
    return [dataclasses.replace(r, query=query) for r in records]
