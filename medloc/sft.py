"""The SFT baseline (Table 1's SFT row, and the stand-in pretraining of the embedded default).

Teacher-forced cross-entropy on the answer text (+ the closing ``<|im_end|>``), on the same data,
engine and checkpoints as GRPO. The answer box is the ground truth mapped into the model-input
frame with the same function that maps predictions back (``medloc.boxes``).

The logits are computed only at the positions whose next label is supervised (the answer, about
20 tokens a row), not over the whole sequence (image and prompt, about 1,300 tokens at the paper
preset's image size): the forward hands ``lm_head`` only those positions' hidden states
(``supervised_positions``), and the cross-entropy upcasts them to float32 in chunks
(``token_cross_entropy``). Same loss and gradient as full-sequence logits, to float rounding
(tests/integration/test_sft.py).
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
from medloc.grpo.loss import CE_CHUNK_ELEMENTS
from medloc.logging import console


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the next-token loss is taken: position t predicts ``labels[:, t+1]``.

    Returns ``keep`` [n, T] bool, True at the positions whose next label is supervised (not
    ``IGNORE_INDEX``; the last position predicts nothing), and ``targets`` [M] long, those labels
    in row-major order -- the order of ``hidden_states[keep]``, i.e. of the logits a forward with
    ``logits_to_keep=keep`` returns (``transformers.modeling_utils.slice_logits_to_keep``).
    """
    supervised = labels[:, 1:] != IGNORE_INDEX  # [n, T-1]
    keep = torch.zeros_like(labels, dtype=torch.bool)  # [n, T]
    keep[:, :-1] = supervised
    return keep, labels[:, 1:][supervised]  # [n, T], [M]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy ``-sum log softmax(logits)[targets]`` in float32, in chunks.

    logits [M, V] (any float dtype): the logits of the M supervised positions only
    (``supervised_positions``); targets [M]: the tokens they must predict. Chunks of at most
    ``CE_CHUNK_ELEMENTS`` logits are upcast to float32 one at a time, so no float32 copy of more
    than one chunk is made at once. Differentiable.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [M, V] and targets [M]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.shape[0] == 0:
        return logits.sum(dtype=compute_dtype)  # 0, differentiable
    step = max(1, CE_CHUNK_ELEMENTS // max(1, logits.shape[1]))  # positions per chunk
    total = None
    for start in range(0, logits.shape[0], step):
        chunk = logits[start: start + step].to(compute_dtype)  # [m, V] float32
        part = torch.nn.functional.cross_entropy(chunk, targets[start: start + step],
                                                 reduction="sum")
        total = part if total is None else total + part
    return total


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
            keep, targets = supervised_positions(part["labels"].to(dev))  # [n, T], [M]
            # lm_head only on the M supervised positions (a boolean logits_to_keep: transformers
            # flattens them to [M, H]), never the [n, T, V] logits of the whole sequence. Through
            # the DeepSpeed engine's forward: its backward bookkeeping and ZeRO-3's hooks.
            logits = self.engine.policy(**inputs, use_cache=False,
                                        logits_to_keep=keep).logits  # [M, V]
            loss_sum = token_cross_entropy(logits, targets)
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
