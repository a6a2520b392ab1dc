"""Score any predictions file with the paper's metrics (PAPER.md §5).

Usage::

    python -m eval.score PRED.jsonl [--out METRICS.json] [--op ">="|">"]

Input: one JSON object per line, boxes in ORIGINAL-image pixels, float xyxy::

    {"id": "ISIC_0024306", "pred_box": [x1, y1, x2, y2] or null, "gt_box": [x1, y1, x2, y2],
     "confidence": 0.93}                      # confidence optional; other keys are ignored

``pred_box: null`` is a parse failure (IoU 0, a miss). Blank lines are ignored.

Output: the metrics (see ``eval.metrics.score_predictions``) are printed as JSON and written to
``<PRED stem>.metrics.json`` beside the input (``preds.jsonl`` -> ``preds.metrics.json``), or to
``--out``. The write is atomic. If any line is malformed, every bad line is reported on stderr as
``FILE:LINE: problem``, nothing is written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from eval.metrics import HitOp, score_predictions, validate_record
from medloc.atomic import write_json_atomic


class PredictionFileError(ValueError):
    """A predictions file with malformed lines; ``problems`` lists ``(line_number, message)``."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        self.path = path
        self.problems = problems
        shown = "\n".join(f"{path}:{line}: {msg}" for line, msg in problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} malformed line(s) in {path}:\n{shown}{more}")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a predictions JSONL file; raise PredictionFileError naming bad lines."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    problems: list[tuple[int, str]] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = validate_record(json.loads(line))
            except json.JSONDecodeError as err:
                problems.append((line_no, f"not valid JSON ({err.msg} at column {err.colno})"))
                continue
            except ValueError as err:
                problems.append((line_no, str(err)))
                continue
            key = str(rec["id"])
            if key in first_line_of:
                msg = f"duplicate id {rec['id']!r} (first on line {first_line_of[key]})"
                problems.append((line_no, msg))
                continue
            first_line_of[key] = line_no
            records.append(rec)
    if problems:
        raise PredictionFileError(path, problems)
    if not records:
        raise PredictionFileError(path, [(0, "no prediction records in the file")])
    return records


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
        print(f"error: {args.predictions}: no such file", file=sys.stderr)
        return 1
    try:
        records = read_predictions(args.predictions)
        metrics = score_predictions(records, op=args.op)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = args.out if args.out is not None else default_output_path(args.predictions)
    write_json_atomic(out, metrics, sort_keys=False)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
