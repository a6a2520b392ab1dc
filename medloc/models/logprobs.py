"""The training forward: log-probs of completion tokens under a model (GRPO policy, old policy,
reference; the exactness tests of ``medloc.generation``), and the vision features it can take
instead of running the tower on every row.

Dimension names (DESIGN.md): n rows of a prompt+completion batch (``collate.append_completions``),
G rows per prompt (row r shows prompt r // G's image), L completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medloc.data.collate import every_nth_row, model_inputs, slice_batch
from medloc.generation import ban_mask, encoder_outputs, image_features
from medloc.grpo.loss import sampled_token_logprobs


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

    ``batch["position_ids"]`` (optional, ``[n, 3, T]``, ``generation.sequence_positions``): the
    M-RoPE positions, passed to the forward instead of letting it run ``get_rope_index`` row by row.
    """
    mask = batch["completion_mask"]  # [n, L]
    length = mask.shape[1]
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    if "position_ids" in batch:  # [n, 3, T] from the rollout: no get_rope_index per forward
        inputs["position_ids"] = batch["position_ids"].to(device).transpose(0, 1)  # [3, n, T]
    if image_features is not None:
        del inputs["pixel_values"]
        inputs["mm_encoder_outputs"] = encoder_outputs(image_features)
    logits = model(**inputs, logits_to_keep=length + 1, use_cache=False).logits  # [n, L+1, V]
    banned = ban_mask(logits.shape[-1], suppress_token_ids, logits.device)  # [V]
    ids = batch["input_ids"][:, -length:].to(device)  # [n, L]
    return sampled_token_logprobs(logits[:, :-1], ids, temperature=temperature,
                                  banned=banned)  # [n, L]


def prompts_of_rows(rows: range, group: int) -> range:
    """The prompts that rows ``rows`` of a GRPO batch belong to (row r to prompt ``r // group``)."""
    if len(rows) == 0 or rows.step != 1:
        raise ValueError(f"rows must be a non-empty contiguous range, got {rows}")
    return range(rows.start // group, (rows.stop - 1) // group + 1)


def prompt_image_features(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                          prompts: range, group: int) -> tuple[torch.Tensor, ...]:
    """The vision tower's features of the images of ``prompts``, the tower run once per image.

    ``batch``: a GRPO batch whose rows ``p*group .. p*group+group-1`` all show prompt p's image.
    Returns one tensor ``[tokens_p, H]`` per prompt of ``prompts`` (``generation.image_features``
    on the first row of each), with grad when grad is enabled and the tower has trainable
    parameters: handed to the prompt's rows (``generation.rows_features``), the gradients of all
    of them flow back into this one forward of the tower.
    """
    part = slice_batch(batch, prompts.start * group, prompts.stop * group)  # whole groups
    return image_features(model, every_nth_row(part, group))  # len(prompts) tensors
