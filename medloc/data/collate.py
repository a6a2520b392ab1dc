"""Collation through the Qwen2.5-VL processor: prompt batches, SFT batches, prompt+completion batches.

Dimension names (DESIGN.md): B prompts, G samples per prompt, N = B*G rows, P prompt tokens
(left-padded), L completion tokens (right-padded), V vocabulary, S vision patches in the batch.

Every batch is a dict of CPU tensors. The keys a Qwen2.5-VL forward/generate takes are
`MODEL_INPUT_KEYS`; `model_inputs(batch)` selects them. Two pitfalls this module exists to avoid:

- transformers 5.x Qwen2.5-VL computes M-RoPE positions only when `mm_token_type_ids` reaches the
  forward (0 text, 1 image, 2 video per token); without it the forward silently falls back to 1-D
  text positions for the image tokens, and training log-probs disagree with the sampler's. Every
  batch here carries it, extended with zeros over completion tokens.
- The box frame is the MODEL INPUT (the resized image), whose size per image is
  `image_grid_thw[:, 1:] * patch_size` with the patch size read from the processor
  (docs/method.md §1); it is returned as ``input_hw`` so nobody recomputes it from a literal 14 or 28.

Row layout of a prompt+completion batch (one row): ``[pad ... pad | prompt | completion | pad]``.
Prompts are LEFT-padded (so generation appends at the same column for every row), completions
RIGHT-padded; the attention mask is 0 on both kinds of padding and after a completion's first EOS.
Logits for the L completion tokens of a forward on such a batch are ``logits[:, -L-1:-1]``
(or pass ``logits_to_keep=L+1`` to the model and take ``logits[:, :-1]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MODEL_INPUT_KEYS = (
    "input_ids",  # [N, T] long
    "attention_mask",  # [N, T] long, 1 = real token
    "mm_token_type_ids",  # [N, T] long, 0 text / 1 image / 2 video
    "pixel_values",  # [S, C*temporal_patch*patch*patch] float, all images' patches concatenated
    "image_grid_thw",  # [N, 3] long, (t, h, w) in patches per image
)

IGNORE_INDEX = -100  # label value the HF causal-LM loss skips


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The subset of `batch` a Qwen2.5-VL forward or `generate` accepts (`MODEL_INPUT_KEYS`)."""
    missing = [k for k in MODEL_INPUT_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch lacks model inputs {missing}; it has {sorted(batch)}")
    return {k: batch[k] for k in MODEL_INPUT_KEYS}


def render_prompt(processor: Any, messages: str | list[dict[str, Any]]) -> str:
    """Chat-template text of one prompt, ending with the assistant header (generation prompt).

    A string is returned unchanged (taken to be already rendered).
    """
    if isinstance(messages, str):
        return messages
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _patch_size(processor: Any) -> int:
    patch = processor.image_processor.patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"non-square patch size {patch} is not supported")
        patch = patch[0]
    return int(patch)


def encode_prompts(
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str | list[dict[str, Any]]],
) -> dict[str, torch.Tensor]:
    """Encode B (image, prompt) pairs for generation: left-padded, one image per prompt.

    `prompts[i]` is either chat messages (see `medloc.data.prompts.build_messages`) or text already
    rendered with the chat template. Returns the `MODEL_INPUT_KEYS` plus
    ``input_hw`` [B, 2] long: (height, width) in pixels of each image as the model sees it.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; need one each")
    if len(prompts) == 0:
        raise ValueError("encode_prompts needs at least one prompt")
    texts = [render_prompt(processor, p) for p in prompts]
    enc = processor(
        text=texts,
        images=list(images),
        padding=True,
        padding_side="left",
        return_tensors="pt",
        return_mm_token_type_ids=True,
    )
    grid = enc["image_grid_thw"].long()  # [B, 3]
    if grid.shape[0] != len(prompts):
        raise ValueError(
            f"expected exactly one image per prompt ({len(prompts)}), the processor saw "
            f"{grid.shape[0]}: does every prompt hold one image placeholder?"
        )
    batch = {
        "input_ids": enc["input_ids"].long(),  # [B, P]
        "attention_mask": enc["attention_mask"].long(),  # [B, P]
        "mm_token_type_ids": enc["mm_token_type_ids"].long(),  # [B, P]
        "pixel_values": enc["pixel_values"],  # [S, C*T*patch*patch]
        "image_grid_thw": grid,  # [B, 3]
        "input_hw": grid[:, 1:] * _patch_size(processor),  # [B, 2] (h, w) model-input pixels
    }
    return batch


def repeat_prompts(prompt_batch: dict[str, torch.Tensor], repeat: int) -> dict[str, torch.Tensor]:
    """Repeat every prompt `repeat` times, copies adjacent (row i -> rows i*G .. i*G+G-1).

    The same order as ``generate(num_return_sequences=G)``. Pixel patches are repeated per image.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if repeat == 1:
        return dict(prompt_batch)
    grid = prompt_batch["image_grid_thw"]  # [B, 3]
    per_image = grid.prod(dim=-1).tolist()  # patches per image
    chunks = torch.split(prompt_batch["pixel_values"], per_image, dim=0)
    pixels = torch.cat([c for c in chunks for _ in range(repeat)], dim=0)  # [S*G, D]
    out: dict[str, torch.Tensor] = {}
    for key, value in prompt_batch.items():
        if key == "pixel_values":
            out[key] = pixels
        else:
            out[key] = value.repeat_interleave(repeat, dim=0)  # [B*G, ...]
    return out


def every_nth_row(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Rows 0, n, 2n, ... of a batch (the inverse of ``repeat_prompts(batch, n)``), pixel patches
    taken per image."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grid = batch["image_grid_thw"]  # [N, 3]
    chunks = torch.split(batch["pixel_values"], grid.prod(dim=-1).tolist(), dim=0)
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key == "pixel_values":
            out[key] = torch.cat(chunks[::n], dim=0)  # [S/n, D]
        else:
            out[key] = value[::n]  # [N/n, ...]
    return out


def slice_batch(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a collated batch (one micro-batch); pixel patches sliced per image."""
    per_image = batch["image_grid_thw"].prod(dim=-1)  # [N]
    offsets = torch.cat([per_image.new_zeros(1), per_image.cumsum(0)])  # [N+1]
    out = {}
    for key, value in batch.items():
        if key == "pixel_values":
            out[key] = value[int(offsets[start]): int(offsets[stop])]
        else:
            out[key] = value[start:stop]
    return out


def completion_mask_from_ids(
    completion_ids: torch.Tensor, eos_id: int | Sequence[int]
) -> torch.Tensor:
    """[N, L] long mask: 1 up to and including the first EOS of each row, 0 after.

    A row without EOS (truncated at max_new_tokens) is all ones.
    """
    eos = torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id))
    is_eos = torch.isin(completion_ids, eos.to(completion_ids.device))  # [N, L]
    length = completion_ids.shape[1]
    # index of the first EOS, or L when there is none
    first = torch.where(
        is_eos.any(dim=1),
        is_eos.int().argmax(dim=1),
        torch.full_like(is_eos[:, 0], length, dtype=torch.long),
    )  # [N]
    positions = torch.arange(length, device=completion_ids.device)  # [L]
    return (positions[None, :] <= first[:, None]).long()  # [N, L]


def append_completions(
    prompt_batch: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    *,
    pad_id: int,
    eos_id: int | Sequence[int],
    repeat: int = 1,
) -> dict[str, torch.Tensor]:
    """Prompt + completion batch for a log-prob forward (GRPO policy/reference, SFT).

    `prompt_batch` comes from `encode_prompts` (B rows); `completion_ids` [N, L] are the sampled
    tokens, N = B * `repeat` with the G copies of a prompt adjacent (`repeat=1` if the prompt batch
    is already repeated). Tokens after a row's first EOS are replaced by `pad_id` and masked.

    Returns the `MODEL_INPUT_KEYS` over [N, P+L], ``input_hw`` [N, 2], and
    ``completion_mask`` [N, L] (1 up to and including the first EOS, 0 after). Logits predicting
    the completion tokens are ``logits[:, -L-1:-1]``.
    """
    prompts = repeat_prompts(prompt_batch, repeat)
    n_rows = prompts["input_ids"].shape[0]
    if completion_ids.ndim != 2 or completion_ids.shape[0] != n_rows:
        raise ValueError(
            f"completion_ids must be [N={n_rows}, L] (B={prompt_batch['input_ids'].shape[0]} "
            f"prompts x repeat={repeat}), got shape {tuple(completion_ids.shape)}"
        )
    completion_ids = completion_ids.long()
    completion_mask = completion_mask_from_ids(completion_ids, eos_id)  # [N, L]
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)  # [N, L]
    out = dict(prompts)
    out["input_ids"] = torch.cat([prompts["input_ids"], completion_ids], dim=1)  # [N, P+L]
    out["attention_mask"] = torch.cat(
        [prompts["attention_mask"], completion_mask], dim=1
    )  # [N, P+L]
    out["mm_token_type_ids"] = torch.cat(
        [prompts["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1
    )  # [N, P+L]: completions are text
    out["completion_mask"] = completion_mask  # [N, L]
    return out


def encode_sft(
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str | list[dict[str, Any]]],
    answers: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Supervised batch: prompt, then the answer text and the tokenizer's EOS (``<|im_end|>``).

    The answer is tokenized on its own (no special tokens added) and appended after the prompt's
    assistant header, exactly where generation would put it, so SFT and GRPO see the same layout
    (`append_completions`). ``labels`` [B, P+L] copies ``input_ids`` on the answer tokens and
    the EOS and is `IGNORE_INDEX` (-100) on the prompt and on all padding.
    """
    if len(answers) != len(prompts):
        raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts")
    tokenizer = processor.tokenizer
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None or pad_id is None:
        raise ValueError(
            f"the tokenizer needs eos and pad tokens for SFT, has eos={tokenizer.eos_token!r} "
            f"pad={tokenizer.pad_token!r}"
        )
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos_id] for a in answers]
    for answer, ids in zip(answers, answer_ids):
        if eos_id in ids[:-1]:
            raise ValueError(f"answer {answer!r} contains the EOS token {tokenizer.eos_token!r}")
    length = max(len(ids) for ids in answer_ids)
    completion = torch.full((len(answers), length), pad_id, dtype=torch.long)  # [B, L]
    for row, ids in enumerate(answer_ids):
        completion[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    batch = append_completions(
        encode_prompts(processor, images, prompts), completion, pad_id=pad_id, eos_id=eos_id
    )
    prompt_len = batch["input_ids"].shape[1] - length
    labels = batch["input_ids"].clone()  # [B, P+L]
    labels[:, :prompt_len] = IGNORE_INDEX
    labels[:, prompt_len:] = labels[:, prompt_len:].masked_fill(
        batch["completion_mask"] == 0, IGNORE_INDEX
    )
    batch["labels"] = labels
    return batch
