"""Score any predictions file with the paper's metrics (docs/method.md §5).

Usage::

    python -m eval.score PRED.jsonl [--out METRICS.json] [--op ">="|">"]

Input: one JSON object per line, boxes in ORIGINAL-image pixels, float xyxy::

    {"id": "ISIC_0024306", "pred_box": [x1, y1, x2, y2] or null, "gt_box": [x1, y1, x2, y2],
     "confidence": 0.93}                      # confidence optional; other keys are ignored

``pred_box: null`` is a parse failure (IoU 0, a miss). A ``pred_box`` with x2 < x1 or y2 < y1
(inverted) or without area (empty) scores IoU 0 as well; each such line is named on stderr
(``FILE:LINE: warning: ...``) and counted in ``invalid_box_rate``. ``confidence`` is optional for
the whole file: on every predicted box (COCO AP is added) or on none; some but not all is an error
naming the first line without it. Blank lines are ignored.

Units: accuracies, rates and APs in percent, ``mean_iou`` as a fraction 0-1 (``medloc.metrics``).

Output: the metrics (see ``medloc.metrics.score_predictions``) are printed as JSON and written to
``<PRED stem>.metrics.json`` beside the input (``preds.jsonl`` -> ``preds.metrics.json``), or to
``--out``. The write is atomic. If any line is malformed, every bad line is reported on stderr as
``FILE:LINE: problem``, nothing is written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from medloc.atomic import write_json_atomic
from medloc.logging import console
from medloc.metrics import HitOp, invalid_boxes, read_predictions_with_lines, score_predictions


def default_output_path(pred_path: str | Path) -> Path:
    """``dir/preds.jsonl`` -> ``dir/preds.metrics.json``."""
    p = Path(pred_path)
    return p.with_name(f"{p.stem}.metrics.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n")[0])
    parser.add_argument("predictions", type=Path, help="predictions JSONL file")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the metrics JSON (default: <stem>.metrics.json "
                             "beside the input)")
    parser.add_argument("--op", choices=get_args(HitOp), default=">=",
                        help="hit rule: IoU >= t (paper, default) or IoU > t")
    args = parser.parse_args(argv)

    if not args.predictions.is_file():
        console(f"error: {args.predictions}: no such file", err=True)
        return 1
    try:
        numbered = read_predictions_with_lines(args.predictions)
        records = [rec for _, rec in numbered]
        metrics = score_predictions(records, op=args.op)
    except ValueError as err:
        console(f"error: {err}", err=True)
        return 1
    bad = invalid_boxes(records)
    for i, problem in bad[:20]:
        line, rec = numbered[i]
        want = "x1 <= x2 and y1 <= y2" if problem == "inverted" else "x2 > x1 and y2 > y1"
        console(f"{args.predictions}:{line}: warning: {problem} pred_box {rec['pred_box']} "
                f"(id {rec['id']!r}; expected {want}): scored IoU 0", err=True)
    if len(bad) > 20:
        console(f"... and {len(bad) - 20} more inverted or empty boxes", err=True)
    out = args.out if args.out is not None else default_output_path(args.predictions)
    write_json_atomic(out, metrics, sort_keys=False)
    console(json.dumps(metrics, indent=2))
    console(f"wrote {out}", err=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
