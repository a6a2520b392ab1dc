"""The numbers MedLoc-R1 reports (docs/method.md §6), as data, so tables can print them beside ours.

All values are percent, Qwen2.5-VL-3B unless stated. Rows are keyed by ARM: the name of the
``conf/arm/<arm>.yaml`` a run was made with, which its ``run_info.json`` records (see
``eval.table``): ``medloc``, ``sft``, ``vlm_r1`` (fixed tau = 0.5), ``v_triune``, ``raw_iou``,
``zero_shot``, ``fixed_conservative``, ``fixed_moderate``, ``fixed_aggressive``, and MedLoc-R1's
ablations ``no_reward_check``, ``no_stability_check``, ``no_margin_check``, ``reward_check_only``,
``medloc_linear``, ``medloc_cosine``, ``refresh_full``, ``refresh_quarter``, ``refresh_none``.
"""

from __future__ import annotations

REFERENCE_ARM = "medloc"

ARM_LABELS: dict[str, str] = {
    "medloc": "MedLoc-R1",
    "sft": "SFT",
    "vlm_r1": "VLM-R1 (τ=0.5)",
    "v_triune": "V-Triune",
    "v_triune_medloc_range": "V-Triune (0.3/0.5/0.8)",
    "raw_iou": "Raw-IoU",
    "zero_shot": "Zero-shot",
    "fixed_conservative": "Fixed-Conservative",
    "fixed_moderate": "Fixed-Moderate",
    "fixed_aggressive": "Fixed-Aggressive",
}

METRIC_LABELS: dict[str, str] = {
    "acc@0.5": "Acc@0.5",
    "acc@0.75": "Acc@0.75",
    "acc@0.8": "Acc@0.8",
    "pseudo_map": "pseudo-mAP",
    "mean_iou": "mean IoU",
    "parse_fail_rate": "parse fail %",
}

PAPER_DATASETS: tuple[str, ...] = ("ham10000", "heel", "tn3k")

TABLE1_ARMS: tuple[str, ...] = ("medloc", "sft", "vlm_r1", "v_triune", "raw_iou")
"""Table 1 columns in the paper's order."""

STANDS_FOR: dict[str, str] = {"v_triune_medloc_range": "v_triune"}
"""Arm -> the paper's Table 1 column it is another preset of (shown beside it; the paper's
column is left out of a sweep that ran only the other preset)."""

TABLE1: dict[tuple[str, str], dict[str, float]] = {
    ("ham10000", "acc@0.5"): {"medloc": 94.46, "sft": 90.31, "vlm_r1": 64.65,
                              "v_triune": 88.92, "raw_iou": 92.86},
    ("ham10000", "acc@0.8"): {"medloc": 76.02, "sft": 74.22, "vlm_r1": 18.57,
                              "v_triune": 64.35, "raw_iou": 69.25},
    ("heel", "acc@0.8"): {"medloc": 47.35, "sft": 45.18, "vlm_r1": 4.17,
                          "v_triune": 25.05, "raw_iou": 11.49},
    ("heel", "pseudo_map"): {"medloc": 59.01, "sft": 56.25, "vlm_r1": 21.41,
                             "v_triune": 38.61, "raw_iou": 35.29},
    ("tn3k", "acc@0.5"): {"medloc": 66.18, "sft": 62.39, "vlm_r1": 43.01,
                          "v_triune": 43.50, "raw_iou": 57.17},
    ("tn3k", "pseudo_map"): {"medloc": 37.96, "sft": 36.11, "vlm_r1": 20.78,
                             "v_triune": 21.85, "raw_iou": 29.28},
}
"""(dataset, metric) -> arm -> value: the reference rows of Table 1 (docs/method.md §6)."""

SCALE_DATASET, SCALE_METRIC = "heel", "acc@0.8"
SCALE: dict[str, float] = {"3b": 47.35, "7b": 57.83, "32b": 57.96}
"""MedLoc-R1 HEEL Acc@0.8 by model size (docs/method.md §6)."""

CRITERIA_DATASET, CRITERIA_METRIC = "ham10000", "acc@0.5"
CRITERIA: dict[str, float] = {
    "medloc": 94.96,  # full: all three checks
    "no_reward_check": 82.33,
    "no_margin_check": 90.86,
    "no_stability_check": 89.72,
    "reward_check_only": 88.32,
}
"""Arm -> HAM10000 Acc@0.5, update-criteria ablation (docs/method.md §6)."""

SCHEDULE_DATASET, SCHEDULE_METRIC = "ham10000", "acc@0.5"
SCHEDULE: dict[str, float] = {
    "medloc": 94.96,  # adaptive
    "fixed_conservative": 87.92,
    "fixed_moderate": 83.92,
    "fixed_aggressive": 71.54,
}
"""Arm -> HAM10000 Acc@0.5, schedule-strategy ablation (docs/method.md §6)."""


def base_dataset(name: str) -> str:
    """The paper dataset a run's dataset stands for: ``phantom_ham10000`` -> ``ham10000``."""
    return name.removeprefix("phantom_")
