"""How sparse is the reward? Sampled all-zero group fraction of a checkpoint at several IoU thresholds.

    python -m experiments.sparsity --checkpoint cache/standin/tiny-1m/final \
        experiment=table1_embedded dataset=phantom_heel          # any medloc.train overrides

Samples G completions (the run's temperature, top_p, max_new_tokens) for ``--prompts`` prompts of the
train split and reports, per threshold τ, the fraction of groups in which NO sample reaches
IoU >= τ (a binary reward at τ gives those groups zero advantage: docs/method.md's sparsity symptom), the
hit rate, and the mean sampled IoU. Answers are read with the run's ``reward.parse_rule`` (as in
training and evaluation). Writes the numbers as JSON with ``--out``, with the raw sampled IoUs
(``"ious"``: [prompts x G], 6 decimals) and the run's ``max_steps``, ``prompts_per_step`` and
comparison ``op``: the input of ``python -m medloc.curriculum.calibrate --probe``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from medloc.atomic import write_json_atomic
from medloc.logging import console

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_sparsity(ious: np.ndarray, thresholds: list[float]) -> dict[str, dict[str, float]]:
    """``ious`` [B, G] -> {τ: {all_zero_frac, hit_rate}} with hit = IoU >= τ."""
    out = {}
    for t in thresholds:
        hits = ious >= t  # [B, G]
        out[f"{t:.2f}"] = {"all_zero_frac": float((~hits.any(axis=1)).mean()),
                           "hit_rate": float(hits.mean())}
    return out


def probe_ious(ious: np.ndarray) -> list[list[float]]:
    """``ious`` [B, G] as nested lists rounded to 6 decimals (as the training log's ious.jsonl)."""
    return [[round(float(x), 6) for x in row] for row in np.asarray(ious, dtype=np.float64)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="HF folder of the model to probe")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--thresholds", default="0.1,0.3,0.5,0.75")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides, as for medloc.train")
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from data_prep.build import ensure_dataset
    from medloc.config import register_configs, to_run_config
    from medloc.data.dataset import GroundingDataset
    from medloc.data.records import with_query
    from medloc.grpo.rollout import rollout
    from medloc.models.loading import load_model, load_processor, vision_token_ids
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=args.overrides))
    ensure_dataset(cfg.dataset)
    data = GroundingDataset(Path(cfg.dataset.dir) / f"{cfg.dataset.train_split}.jsonl")
    data.records = with_query(data.records, cfg.dataset.query)
    processor = load_processor(args.checkpoint, min_pixels=cfg.dataset.min_pixels,
                               max_pixels=cfg.dataset.max_pixels)
    model = load_model(args.checkpoint)
    suppress = vision_token_ids(processor)
    g = cfg.grpo.num_generations
    idx = np.random.default_rng(args.seed).permutation(len(data))[: args.prompts]
    torch.manual_seed(args.seed)
    groups = []
    for start in range(0, len(idx), 8):
        samples = [data[int(i)] for i in idx[start:start + 8]]
        ro = rollout(model, processor, [s.record for s in samples], [s.image for s in samples],
                     answer_format=cfg.reward.answer_format, parse_rule=cfg.reward.parse_rule,
                     num_generations=g,
                     temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p,
                     max_new_tokens=cfg.grpo.max_new_tokens, suppress_token_ids=suppress,
                     cache=cfg.grpo.kv_cache, compile_decode=cfg.grpo.compile_decode)
        groups.append(ro.ious.reshape(-1, g))  # [b, G]
    ious = np.concatenate(groups)  # [B, G]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    result = {"checkpoint": args.checkpoint, "dataset": cfg.dataset.name, "prompts": len(ious),
              "G": g, "temperature": cfg.grpo.temperature, "parse_rule": cfg.reward.parse_rule,
              "mean_sampled_iou": float(ious.mean()), "by_threshold": group_sparsity(ious, thresholds),
              # what the calibration reads (medloc.curriculum.calibrate): the run it calibrates for
              "max_steps": cfg.trainer.max_steps, "prompts_per_step": cfg.trainer.prompts_per_step,
              "op": cfg.curriculum.op, "ious": probe_ious(ious)}
    line = ", ".join(f"τ={t}: all-zero {v['all_zero_frac']:.0%} (hit {v['hit_rate']:.0%})"
                     for t, v in result["by_threshold"].items())
    console(f"[sparsity] {cfg.dataset.name}: {line}; mean sampled IoU {ious.mean():.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
