"""The training forward: log-probs of completion tokens under a model (GRPO policy, old policy,
reference; the exactness tests of ``medloc.generation``).

Dimension names (DESIGN.md): n rows of a prompt+completion batch (``collate.append_completions``),
L completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medloc.data.collate import model_inputs
from medloc.generation import ban_mask, encoder_outputs
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
