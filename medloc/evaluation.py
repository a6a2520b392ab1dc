"""Evaluate a checkpoint: greedy decoding on a split -> predictions.jsonl -> metrics.json (docs/method.md §5).

``evaluate_checkpoint`` is what ``medloc.train`` runs after training and what ``python -m
eval.evaluate`` runs on any checkpoint: a Hugging Face folder, or a LoRA adapter folder
(``final/adapter`` of a ``peft=lora`` run) on the base model it names. ``predictions.jsonl`` is appended batch by batch (id, raw
completion, parsed box in ORIGINAL pixels, GT box, IoU, confidence), so an interrupted evaluation
resumes where it stopped and never re-scores what is already there.

Decoding, parsing and scoring go through the training rollout (``medloc.grpo.rollout.rollout``
with G=1 and ``do_sample=False``: greedy, vision once per image, static KV cache, up to EOS); the
box is read with the configured ``reward.parse_rule`` (recorded in metrics.json) and mapped to
original pixels by the same function training rewards use. Confidence = the model's mean
log-probability of the tokens inside ``<answer>...</answer>``, exponentiated (in (0, 1];
``medloc.metrics.answer_confidence``), from the decoder's own log-probs (no second forward); it
feeds COCO AP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medloc.atomic import atomic_write_text
from medloc.config import DatasetConfig, EvalConfig
from medloc.jsonl import JsonlError, read_jsonl
from medloc.logging import console


def _done_ids(path: Path) -> set[str]:
    """Ids already in a predictions file; a trailing line cut by a kill is dropped.

    The file is rewritten (atomically) with the lines before the first one that is not JSON.
    """
    if not path.is_file():
        return set()
    text = path.read_text(encoding="utf-8")
    rows = read_jsonl(path, text=text, bad="keep")
    cut = next((i for i, (_, row) in enumerate(rows) if isinstance(row, JsonlError)), len(rows))
    lines = text.split("\n")
    atomic_write_text(path, "".join(lines[n - 1] + "\n" for n, _ in rows[:cut]))
    return {str(row["id"]) for _, row in rows[:cut]}


@torch.no_grad()
def evaluate_checkpoint(
    *,
    checkpoint: str,
    dataset: DatasetConfig,
    eval_cfg: EvalConfig,
    answer_format: str,
    parse_rule: str = "vlm_r1",
    out_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy-decode the eval split of ``dataset`` with ``checkpoint``; write and return metrics."""
    from medloc.atomic import write_json_atomic
    from medloc.data.dataset import GroundingDataset
    from medloc.data.records import with_query
    from medloc.grpo.rollout import rollout
    from medloc.metrics import answer_confidence, read_predictions, score_predictions
    from medloc.models.loading import load_model, load_processor, vision_token_ids
    from medloc.models.lora import adapter_base_model, is_adapter_folder, load_adapter_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    data = GroundingDataset(Path(dataset.dir) / f"{dataset.eval_split}.jsonl")
    data.records = with_query(data.records, dataset.query)
    records = data.records
    if dataset.max_eval_samples is not None and dataset.max_eval_samples < len(records):
        # A fixed (seed 0) spread over the split, the same for every run: the first N records of a
        # split are not representative (converters write them grouped by source or modality).
        keep = np.random.default_rng(0).permutation(len(records))[: dataset.max_eval_samples]
        records = [records[i] for i in sorted(keep)]
    done = _done_ids(pred_path)
    index = {r.id: i for i, r in enumerate(data.records)}
    todo = [index[r.id] for r in records if r.id not in done]

    # A LoRA adapter folder (peft=lora: final/adapter, checkpoints/*/adapter) runs on the base
    # model it names, adapters not merged; any other folder is a Hugging Face model (final/ of a
    # LoRA run holds the merged weights).
    dtype = "float32" if not torch.cuda.is_available() else "bfloat16"
    adapter = is_adapter_folder(checkpoint)
    processor = load_processor(adapter_base_model(checkpoint) if adapter else checkpoint,
                               min_pixels=dataset.min_pixels, max_pixels=dataset.max_pixels)
    model = load_adapter_model(checkpoint, dtype=dtype) if adapter else load_model(checkpoint, dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    suppress = vision_token_ids(processor)
    tok = processor.tokenizer
    bs = eval_cfg.batch_size
    for start in range(0, len(todo), bs):
        samples = [data[i] for i in todo[start:start + bs]]
        recs = [s.record for s in samples]
        ro = rollout(
            model, processor, recs, [s.image for s in samples], answer_format=answer_format,
            parse_rule=parse_rule, num_generations=1, temperature=1.0, top_p=1.0,
            max_new_tokens=eval_cfg.max_new_tokens, suppress_token_ids=suppress, do_sample=False,
        )
        # The greedy answer's own token log-probs, as the decoder computed them (no 2nd forward).
        confidence = answer_confidence(ro.logprobs, [tok.batch_decode([[t] for t in row])
                                                     for row in ro.token_ids()])  # [n]
        with open(pred_path, "a") as f:
            f.writelines(json.dumps({
                    "id": r.id, "completion": t, "pred_box": b, "gt_box": list(r.box),
                    "iou": float(iou), "format_ok": p.format_ok,
                    "confidence": float(c) if b is not None else None,
                }) + "\n" for r, t, p, b, iou, c in zip(recs, ro.texts, ro.parsed, ro.pred_boxes,
                                                         ro.ious, confidence))
        if progress:
            console(f"[eval] {min(start + bs, len(todo))}/{len(todo)} samples")
    metrics = score_predictions(read_predictions(pred_path))
    metrics["checkpoint"] = str(checkpoint)
    metrics["dataset"] = dataset.name
    metrics["split"] = dataset.eval_split
    metrics["parse_rule"] = parse_rule
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
