"""Rollout: sample G completions per prompt, decode them up to EOS, parse and score them (docs/method.md
§2–3). The one sample -> decode -> score path: the GRPO step, evaluation (G=1, greedy;
``medloc.evaluation``) and the sparsity probe (``experiments.sparsity``) all call ``rollout``.

Dimension names: B prompts on this rank, G samples per prompt, N = B*G rows, P prompt tokens,
L completion tokens, V vocabulary. All G samples of a prompt stay on one rank (groups are local).

Nothing here knows DeepSpeed, rewards or the curriculum: the caller passes a ready-to-generate
model. Rewards: ``medloc.rewards.total_rewards``; the training forward's log-probs:
``medloc.models.logprobs``; micro-batches: ``medloc.data.collate.slice_batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medloc.boxes import pairwise_iou, to_original_frame
from medloc.data.collate import append_completions, encode_prompts
from medloc.data.prompts import build_messages
from medloc.generation import Generation, generate, sequence_positions
from medloc.parsing import ParsedAnswer, parse_completion


@dataclass
class Rollout:
    """One step's samples on this rank (N = B*G rows, groups of G adjacent)."""

    # prompt+completion batch (collate.append_completions), [N, P+L], with its M-RoPE
    # "position_ids" [N, 3, P+L] (generation.sequence_positions)
    batch: dict[str, torch.Tensor]
    completion_ids: torch.Tensor  # [N, L], pad after each row's first EOS
    logprobs: torch.Tensor  # [N, L] float32: each sampled token's log-prob (generation); 0 after EOS
    texts: list[str]  # N decoded completions (up to EOS, special tokens skipped)
    parsed: list[ParsedAnswer]  # N
    pred_boxes: list[list[float] | None]  # N, original-image pixels
    gt_boxes: np.ndarray  # [N, 4] original-image pixels
    ious: np.ndarray  # [N] IoU in the original frame; 0 for unparseable answers
    record_ids: list[str]  # N
    # B tensors [tokens_b, H]: the vision tower's output for each prompt's image, computed once by
    # the sampling policy (no grad); row r of the batch shows image r // G.
    image_features: tuple[torch.Tensor, ...] = ()

    def token_ids(self) -> list[list[int]]:
        """Each row's completion tokens up to and including its first EOS (N lists)."""
        lengths = self.batch["completion_mask"].sum(1).tolist()  # [N]
        return [row[:k] for row, k in zip(self.completion_ids.tolist(), lengths)]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    queries: Sequence[str],
    *,
    answer_format: str,
    num_generations: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    suppress_token_ids: Sequence[int],
    do_sample: bool = True,
    cache: str = "static",
    compile_decode: bool = False,
) -> tuple[dict[str, torch.Tensor], Generation]:
    """Generate G completions for each of B (image, query) prompts (``medloc.generation``).

    Returns ``(prompt_batch, generation)``: the encoded prompts (B rows, not repeated) and the
    sampled tokens ``[B*G, L]`` with the G samples of prompt i in rows i*G .. i*G+G-1, plus the B
    images' vision features. Temperature and top-p are applied as given (no top-k); vision special
    tokens are banned.
    """
    messages = [build_messages(q, img, answer_format) for q, img in zip(queries, images)]
    prompt_batch = encode_prompts(processor, images, messages)
    tokenizer = processor.tokenizer
    generation = generate(
        model, prompt_batch, num_samples=num_generations, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        banned_token_ids=suppress_token_ids, do_sample=do_sample, temperature=temperature,
        top_p=top_p, cache=cache, compile_decode=compile_decode,
    )
    return prompt_batch, generation


def score(
    texts: Sequence[str],
    *,
    answer_format: str,
    parse_rule: str = "vlm_r1",
    input_hw: torch.Tensor,
    orig_hw: Sequence[tuple[int, int]],
    gt_boxes: np.ndarray,
) -> tuple[list[ParsedAnswer], list[list[float] | None], np.ndarray]:
    """Parse N completions and compute IoU with the ground truth in ORIGINAL pixels.

    ``input_hw`` [N, 2] is each row's model-input size; a parsed box (model frame) is mapped back with
    ``boxes.to_original_frame``. Unparseable answers get IoU 0 (docs/method.md §1). ``parse_rule``
    (``reward.parse_rule``: vlm_r1 | strict) is how the box is read (``medloc.parsing``).
    """
    parsed = [parse_completion(t, answer_format, parse_rule) for t in texts]
    pred: list[list[float] | None] = []
    for p, hw_in, hw_orig in zip(parsed, input_hw.tolist(), orig_hw):
        pred.append(None if p.box is None else to_original_frame(p.box, tuple(hw_in), tuple(hw_orig)))
    ious = pairwise_iou(pred, gt_boxes)  # [N]
    return parsed, pred, np.asarray(ious, dtype=np.float64)


def rollout(
    model: torch.nn.Module,
    processor: Any,
    records: Sequence[Any],
    images: Sequence[Any],
    *,
    answer_format: str,
    parse_rule: str = "vlm_r1",
    num_generations: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    suppress_token_ids: Sequence[int],
    do_sample: bool = True,
    cache: str = "static",
    compile_decode: bool = False,
) -> Rollout:
    """Sample, decode (up to EOS) and score G completions for each record.

    ``do_sample=False`` (with ``num_generations=1``, temperature and top-p 1) is greedy decoding,
    as evaluation uses it.
    """
    prompt_batch, generation = sample(
        model,
        processor,
        images,
        [r.query for r in records],
        answer_format=answer_format,
        num_generations=num_generations,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        suppress_token_ids=suppress_token_ids,
        do_sample=do_sample,
        cache=cache,
        compile_decode=compile_decode,
    )
    completion_ids = generation.completion_ids  # [N, L]
    tokenizer = processor.tokenizer
    batch = append_completions(
        prompt_batch,
        completion_ids,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        repeat=num_generations,
    )
    if generation.prompt_positions is not None:  # the forwards of the update skip get_rope_index
        batch["position_ids"] = sequence_positions(
            generation.prompt_positions, generation.next_positions, batch["completion_mask"],
            num_generations)  # [N, 3, P+L]
    kept = completion_ids.masked_fill(batch["completion_mask"] == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(kept, skip_special_tokens=True)
    g = num_generations
    gt = np.repeat(np.asarray([r.box for r in records], dtype=np.float64), g, axis=0)  # [N, 4]
    orig_hw = [(r.height, r.width) for r in records for _ in range(g)]
    parsed, pred, ious = score(
        texts, answer_format=answer_format, parse_rule=parse_rule, input_hw=batch["input_hw"],
        orig_hw=orig_hw, gt_boxes=gt,
    )
    return Rollout(
        batch=batch,
        completion_ids=batch["input_ids"][:, -completion_ids.shape[1]:],
        logprobs=generation.logprobs,
        texts=list(texts),
        parsed=parsed,
        pred_boxes=pred,
        gt_boxes=gt,
        ious=ious,
        record_ids=[r.id for r in records for _ in range(g)],
        image_features=generation.image_features,
    )

