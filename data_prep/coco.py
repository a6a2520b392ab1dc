"""Export one split of the unified grounding JSONL as a COCO detection annotation file.

For detection baselines and tools that read COCO (``pycocotools.coco.COCO``):

- ``images``: one entry per distinct image path, ``{"id", "file_name", "width", "height"}``;
  ``file_name`` is the record's image path (relative to the JSONL's folder, unchanged).
- ``annotations``: one per record, ``{"id", "image_id", "category_id": 1, "bbox": [x, y, w, h],
  "area": w*h, "iscrowd": 0, "record_id"}``; COCO's ``bbox`` is ``[x1, y1, x2-x1, y2-y1]`` of our
  continuous xyxy box, so the area is the same number.
- ``categories``: one, named after the dataset (``[{"id": 1, "name": "ham10000", ...}]``).

Ids are assigned 1, 2, ... in record order, so the export is deterministic. An empty split
(a file without records) is an error, not an empty export, and so is an ``--out`` that names a
folder.

CLI: ``python -m data_prep.coco --jsonl OUT/test.jsonl --out OUT/test_coco.json``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from medloc.atomic import write_json_atomic
from medloc.data.records import GroundingRecord, RecordError, read_records
from medloc.logging import console


def records_to_coco(
    records: Sequence[GroundingRecord], *, category: str | None = None
) -> dict[str, Any]:
    """Build the COCO dict for ``records`` (all of one dataset, one category)."""
    datasets = sorted({r.dataset for r in records})
    if category is None:
        if len(datasets) > 1:
            raise RecordError(f"records mix datasets {datasets}; pass category= to name one")
        category = datasets[0] if datasets else "object"
    images: list[dict[str, Any]] = []
    image_ids: dict[str, int] = {}
    annotations: list[dict[str, Any]] = []
    for rec in records:
        if rec.image not in image_ids:
            image_ids[rec.image] = len(images) + 1
            images.append(
                {
                    "id": image_ids[rec.image],
                    "file_name": rec.image,
                    "width": rec.width,
                    "height": rec.height,
                }
            )
        x1, y1, x2, y2 = rec.box
        w, h = x2 - x1, y2 - y1
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_ids[rec.image],
                "category_id": 1,
                "bbox": [x1, y1, w, h],
                "area": w * h,
                "iscrowd": 0,
                "record_id": rec.id,
            }
        )
    return {
        "info": {"description": f"{category} grounding boxes exported from the unified JSONL"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category, "supercategory": "finding"}],
    }


def export_coco(jsonl_path: str, out_path: str, *, category: str | None = None) -> dict[str, Any]:
    """Read ``jsonl_path`` and write its COCO annotation file atomically; returns the dict.

    ``file_name`` stays relative to the JSONL's folder; write ``out_path`` in that folder (the
    default of the CLI) so that COCO tools resolve images the same way.
    """
    if os.path.isdir(out_path):
        raise RecordError(f"{out_path}: --out names a folder; it must be a JSON file path")
    records = read_records(jsonl_path)
    if not records:
        raise RecordError(f"{jsonl_path}: holds no record; nothing to export")
    coco = records_to_coco(records, category=category)
    write_json_atomic(out_path, coco, sort_keys=False, ensure_ascii=False)
    return coco


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="unified grounding JSONL -> COCO detection JSON")
    parser.add_argument("--jsonl", required=True, help="a <split>.jsonl file")
    parser.add_argument(
        "--out", default=None, help="output JSON (default: <split>_coco.json beside it)"
    )
    parser.add_argument(
        "--category", default=None, help="category name (default: the dataset name)"
    )
    args = parser.parse_args(argv)
    out = args.out or os.path.splitext(args.jsonl)[0] + "_coco.json"
    try:
        coco = export_coco(args.jsonl, out, category=args.category)
    except (RecordError, OSError) as exc:
        console(str(exc), err=True)
        return 2
    console(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
