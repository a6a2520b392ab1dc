"""What one run did, in a few lines: steps, τ path, reward, the evaluation, and where the files are.

    python -m eval.summary RUN_DIR [--no-plots]

Reads the run folder that ``python -m medloc.train`` wrote (``run_info.json``, ``metrics.jsonl``,
``eval/metrics.json``) and prints, e.g.::

    == runs/demo: grpo (MedLoc-R1 curriculum) on phantom_ham10000, seed 0, from cache/standin/...
    steps      30 (step 0 to 29), 0.9 s/step
    τ path     0.1 →0.2@12 →0.3@24  (2 raises; →τ@s: first step trained at the new τ)
    reward     mean 1.16 over the first 5 steps → 1.52 over the last 5 (accuracy part 0.22 → 0.52)
    dead groups  0.45 → 0.30 (fraction of groups whose rewards are all equal: no gradient)
    evaluation Acc@0.5 12.0 %, Acc@0.75 1.0 %, pseudo-mAP 3.2 %, mean IoU 0.31 (100 test images;
               parse failures 0.0 %, inverted/empty boxes 0.0 %)
    files      ...

Then draws the run's training curves (``eval.plots.plot_run``) into ``RUN_DIR/plots/`` unless
``--no-plots``. The same text is appended to ``RUN_DIR/train.log``. Nothing is computed here
that the run did not log.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eval.runs import read_metrics_jsonl
from eval.style import arm_label
from eval.tau_paths import trained_path
from medloc.logging import console

HEAD = 5  # steps averaged at the start and at the end of a curve


def _ends(series: dict[int, float]) -> tuple[float, float] | None:
    if not series:
        return None
    steps = sorted(series)
    k = max(1, min(HEAD, len(steps) // 2))
    first = sum(series[s] for s in steps[:k]) / k
    last = sum(series[s] for s in steps[-k:]) / k
    return first, last


def summarize(run_dir: str | Path) -> str:
    """The summary text of one run folder (module doc); raises FileNotFoundError naming what is
    missing when the folder holds no run."""
    run = Path(run_dir)
    info_path = run / "run_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{run} holds no run_info.json: not a run folder of medloc.train")
    info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
    resolved_path = run / "resolved_config.json"
    resolved = json.loads(resolved_path.read_text(encoding="utf-8")) if resolved_path.is_file() else {}
    schedule = (resolved.get("curriculum") or {}).get("schedule")
    arm = info.get("arm") or ""
    what = f"{info.get('method', '?')}"
    if arm:
        what += f", arm {arm_label(arm)}"
    elif schedule and info.get("method") == "grpo":
        what += f" ({schedule} curriculum)"
    head = (f"== {run}: {what} on {info.get('dataset', '?')}, seed {info.get('seed', '?')}, "
            f"from {info.get('init_from', '?')}")
    lines = [head]

    log = run / "metrics.jsonl"
    step_s = read_metrics_jsonl(log, "time/step_s") if log.is_file() else {}
    if step_s:
        steps = sorted(step_s)
        lines.append(f"{'steps':<11} {len(steps)} (step {steps[0]} to {steps[-1]}, as metrics.jsonl "
                     f"numbers them), {sum(step_s.values()) / len(step_s):.2f} s/step")
        path = trained_path(run)
        if path is not None:
            lines.append(f"{'τ path':<11} {path.describe()}  ({path.n_raises} raise"
                         f"{'' if path.n_raises == 1 else 's'}; →τ@s: the first step trained at "
                         f"the new τ)")
        for key, name, note in [
            ("reward/mean", "reward", " (accuracy + format)"),
            ("reward/accuracy", "accuracy", " (the reward's part for IoU >= τ)"),
            ("reward/dead_group_frac", "dead groups",
             " (groups whose rewards are all equal: no gradient)"),
            ("loss/sft", "SFT loss", ""),
        ]:
            ends = _ends(read_metrics_jsonl(log, key))
            if ends is not None:
                lines.append(f"{name:<11} {ends[0]:.3f} mean of the first {HEAD} steps → "
                             f"{ends[1]:.3f} of the last {HEAD}{note}")
    else:
        lines.append(f"{'steps':<11} none logged (zero-shot, or the run has not started)")

    metrics_path = run / "eval" / "metrics.json"
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text(encoding="utf-8"))
        lines.append(
            f"{'eval':<11} Acc@0.5 {m['acc@0.5']:.1f} %, Acc@0.75 {m['acc@0.75']:.1f} %, pseudo-mAP "
            f"{m['pseudo_map']:.1f} %, mean IoU {m['mean_iou']:.3f} ({m['n']} test images, greedy; "
            f"parse failures {m['parse_fail_rate']:.1f} %"
            + (f", inverted/empty boxes {m['invalid_box_rate']:.1f} %" if "invalid_box_rate" in m
               else "") + ")")
    else:
        lines.append(f"{'eval':<11} none yet (no eval/metrics.json)")

    files = [("training log", log), ("console", run / "train.log"),
             ("samples", run / "samples.jsonl"), ("final model", run / "final"),
             ("eval metrics", metrics_path), ("predictions", run / "eval" / "predictions.jsonl"),
             ("plots", run / "plots")]
    shown = [f"{name} {path}" for name, path in files if path.exists()]
    lines.append(f"{'files':<11} " + ("\n" + " " * 12).join(shown))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--no-plots", action="store_true", help="only print the summary")
    args = parser.parse_args(argv)
    try:
        if not args.no_plots and (args.run_dir / "metrics.jsonl").is_file():
            from eval.plots import plot_run

            plot_run(args.run_dir)
        text = summarize(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        console(f"error: {err}", err=True)
        return 1
    console(text)
    with open(args.run_dir / "train.log", "a", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
