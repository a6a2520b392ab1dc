"""The SFT baseline (Table 1's SFT row, and the stand-in pretraining of the embedded default).

Teacher-forced cross-entropy on the answer text (+ the closing ``<|im_end|>``), on the same data,
engine and checkpoints as GRPO. The answer box is the ground truth mapped into the model-input
frame with the same function that maps predictions back (``medloc.boxes``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from medloc import engine as eng
from medloc.base_trainer import BaseTrainer
from medloc.boxes import model_input_hw, to_model_frame
from medloc.config import RunConfig
from medloc.data.collate import IGNORE_INDEX, encode_sft, model_inputs, slice_batch
from medloc.data.prompts import build_messages, format_answer
from medloc.logging import console


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over supervised positions and their count.

    logits [n, T, V] predict labels shifted by one: position t predicts labels[:, t+1].
    Returns (sum of -log p over supervised tokens, number of supervised tokens).
    """
    pred = logits[:, :-1].float()  # [n, T-1, V]
    target = labels[:, 1:]  # [n, T-1]
    loss = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (target != IGNORE_INDEX).sum()


def processor_input_hw(processor: Any, height: int, width: int) -> tuple[int, int]:
    """Model-input (h, w) of an image, from the image processor's own resize rule and budget."""
    ip = processor.image_processor
    patch = ip.patch_size[0] if isinstance(ip.patch_size, (list, tuple)) else ip.patch_size
    return model_input_hw(
        height, width, factor=int(patch) * int(ip.merge_size),
        min_pixels=int(ip.size.shortest_edge), max_pixels=int(ip.size.longest_edge),
    )


class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning with the GRPO trainer's engine, data order and checkpoints."""

    method = "sft"

    def __init__(self, cfg: RunConfig, run_dir: Path, model_path: str):
        bs = cfg.trainer.sft_batch_size
        super().__init__(cfg, run_dir, model_path, samples_per_step=bs, rows_per_step=bs,
                         with_reference=False)

    def encode(self, records: list[Any], images: list[Any]) -> dict[str, torch.Tensor]:
        fmt = self.cfg.reward.answer_format
        messages = [build_messages(r.query, img, fmt) for r, img in zip(records, images)]
        answers = []
        for r in records:
            hw = processor_input_hw(self.processor, r.height, r.width)
            answers.append(format_answer(to_model_frame(r.box, (r.height, r.width), hw), fmt))
        return encode_sft(self.processor, images, messages, answers)

    def train_step(self, step: int) -> dict[str, float]:
        records, images, problems = self.load_step_samples(step)
        for p in problems:
            console(f"[data] skipped unreadable image {p}")
        batch = self.encode(records, images)
        n = batch["input_ids"].shape[0]
        global_tokens = float(eng.all_reduce_sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum().double()))
        mb = self.cfg.model.micro_batch_size
        total = 0.0
        kept = False  # whether any micro-batch's gradient was kept
        for s in range(0, n, mb):
            part = slice_batch(batch, s, min(s + mb, n))
            dev = self.engine.device
            inputs = {k: v.to(dev) for k, v in model_inputs(part).items()}
            logits = self.engine.policy(**inputs, use_cache=False).logits  # [n, T, V]
            loss_sum, _ = token_cross_entropy(logits, part["labels"].to(dev))
            loss = loss_sum / global_tokens
            # Agreed over ranks: a non-finite micro-batch's gradient is left out on every rank.
            kept = self.engine.backward_if_finite(loss) or kept
            total += float(loss.detach())
        total = float(eng.all_reduce_sum(torch.tensor(total, dtype=torch.float64)))
        out = {"loss/sft": total, "optim/lr": self.engine.lr()}
        if not math.isfinite(total):
            self.nonfinite_total += 1
        gn = self.engine.grad_norm() if kept else None
        if gn is not None:
            out["optim/grad_norm"] = gn
        return out
