"""Score any predictions file with the paper's metrics (PAPER.md §5).

Usage::

    python -m eval.score PRED.jsonl [--out METRICS.json] [--op ">="|">"]

Input: one JSON object per line, boxes in ORIGINAL-image pixels, float xyxy::

    {"id": "ISIC_0024306", "pred_box": [x1, y1, x2, y2] or null, "gt_box": [x1, y1, x2, y2],
     "confidence": 0.93}                      # confidence optional; other keys are ignored

``pred_box: null`` is a parse failure (IoU 0, a miss). Blank lines are ignored.

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
from medloc.metrics import HitOp, read_predictions, score_predictions


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
        records = read_predictions(args.predictions)
        metrics = score_predictions(records, op=args.op)
    except ValueError as err:
        console(f"error: {err}", err=True)
        return 1
    out = args.out if args.out is not None else default_output_path(args.predictions)
    write_json_atomic(out, metrics, sort_keys=False)
    console(json.dumps(metrics, indent=2))
    console(f"wrote {out}", err=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
