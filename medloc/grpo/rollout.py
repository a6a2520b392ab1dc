"""Rollout: sample G completions per prompt, decode, parse, and score them (PAPER.md §2–3).

Dimension names: B prompts on this rank, G samples per prompt, N = B*G rows, P prompt tokens,
L completion tokens, V vocabulary. All G samples of a prompt stay on one rank (groups are local).

Nothing here knows DeepSpeed or the curriculum: the caller passes a ready-to-generate model and
the reward threshold as numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medloc.boxes import pairwise_iou, to_original_frame
from medloc.data.collate import append_completions, encode_prompts, model_inputs
from medloc.data.prompts import build_messages
from medloc.generation import Generation, ban_mask, encoder_outputs, generate
from medloc.grpo.loss import sampled_token_logprobs
from medloc.parsing import ParsedAnswer, parse_completion
from medloc.rewards import accuracy_reward, combine_rewards, format_reward


@dataclass
class Rollout:
    """One step's samples on this rank (N = B*G rows, groups of G adjacent)."""

    batch: dict[str, torch.Tensor]  # prompt+completion batch (collate.append_completions), [N, P+L]
    completion_ids: torch.Tensor  # [N, L]
    texts: list[str]  # N decoded completions
    parsed: list[ParsedAnswer]  # N
    pred_boxes: list[list[float] | None]  # N, original-image pixels
    gt_boxes: np.ndarray  # [N, 4] original-image pixels
    ious: np.ndarray  # [N] IoU in the original frame; 0 for unparseable answers
    record_ids: list[str]  # N
    # B tensors [tokens_b, H]: the vision tower's output for each prompt's image, computed once by
    # the sampling policy (no grad); row r of the batch shows image r // G.
    image_features: tuple[torch.Tensor, ...] = ()


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
    ``boxes.to_original_frame``. Unparseable answers get IoU 0 (PAPER.md §1). ``parse_rule``
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
    cache: str = "static",
    compile_decode: bool = False,
) -> Rollout:
    """Sample, decode and score G completions for each record (the grounding records of the step)."""
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
        texts=list(texts),
        parsed=parsed,
        pred_boxes=pred,
        gt_boxes=gt,
        ious=ious,
        record_ids=[r.id for r in records for _ in range(g)],
        image_features=generation.image_features,
    )


def rewards(
    ious: np.ndarray,
    parsed: Sequence[ParsedAnswer],
    *,
    kind: str,
    threshold: float | None,
    op: str,
    accuracy_weight: float,
    format_weight: float,
) -> tuple[np.ndarray, dict[str, float]]:
    """Total reward per sample = w_acc * accuracy(IoU; kind, threshold, op) + w_fmt * format.

    The accuracy kind and threshold come from the schedule (binary at τ, raw IoU, gated IoU).
    """
    components = {
        "accuracy": accuracy_reward(ious, kind, threshold, op),
        "format": format_reward(parsed),
    }
    return combine_rewards(components, {"accuracy": accuracy_weight, "format": format_weight})


def completion_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float,
    suppress_token_ids: Sequence[int] = (),
    image_features: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-probs of the completion tokens ``[n, L]`` under ``model`` (grad flows if enabled).

    Logits are divided by the sampling temperature and the suppressed (vision) tokens get
    probability 0, so the log-probs are those of the distribution the completions were drawn from
    (current TRL also divides by the temperature; PAPER.md is silent).

    ``image_features`` (one tensor per ROW of ``batch``, e.g. ``generation.rows_features``): the
    vision tower's output computed before; the forward then skips the tower (``pixel_values`` are
    not used). Only valid when those features are what this model's tower would compute: the
    sampling policy's own (same weights), or any copy of a frozen tower.
    """
    mask = batch["completion_mask"]  # [n, L]
    length = mask.shape[1]
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    if image_features is not None:
        del inputs["pixel_values"]
        inputs["mm_encoder_outputs"] = encoder_outputs(image_features)
    logits = model(**inputs, logits_to_keep=length + 1, use_cache=False).logits  # [n, L+1, V]
    banned = ban_mask(logits.shape[-1], suppress_token_ids, logits.device)  # [V]
    ids = batch["input_ids"][:, -length:].to(device)  # [n, L]
    return sampled_token_logprobs(logits[:, :-1], ids, temperature=temperature,
                                  banned=banned)  # [n, L]


def slice_batch(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a collated batch; pixel patches are sliced per image."""
    per_image = batch["image_grid_thw"].prod(dim=-1)  # [N]
    offsets = torch.cat([per_image.new_zeros(1), per_image.cumsum(0)])
    out = {}
    for key, value in batch.items():
        if key == "pixel_values":
            out[key] = value[int(offsets[start]): int(offsets[stop])]
        else:
            out[key] = value[start:stop]
    return out
