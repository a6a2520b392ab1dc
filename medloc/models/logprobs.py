"""The training forward: log-probs of completion tokens under a model (GRPO policy, old policy,
reference; the exactness tests of ``medloc.generation``), and the vision features it can take
instead of running the tower on every row.

Dimension names (DESIGN.md): n rows of a prompt+completion batch (``collate.append_completions``),
G rows per prompt (row r shows prompt r // G's image), L completion tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

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
    (current TRL also divides by the temperature; docs/method.md is silent).

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


# ---------------------------------------------------------------------------------------------
# the shared-prefix forward (grpo.shared_prefix_update): each prompt once, its G completions over it
# ---------------------------------------------------------------------------------------------


class _PrefixRecorder(DynamicLayer):
    """One layer's cache in the prefix pass: keeps the prompt's keys/values ``[b, heads, P, d]``
    (with their autograd graph) the first time, returns what it is given.

    Under gradient checkpointing the backward replays the layer with the same arguments: the
    replay gets its own keys/values back and leaves the recorded ones alone (a plain
    ``DynamicLayer`` would append them a second time)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        return key_states, value_states


class _PrefixReader(DynamicLayer):
    """One layer's cache in the completion pass: the prefix's keys/values repeated per row
    ``[n, heads, P, d]``, read only: ``update`` returns prefix + the completion's own keys/values
    and stores nothing, so a checkpointed layer's replay sees the same cache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.keys, key_states], dim=-2),
                torch.cat([self.values, value_states], dim=-2))


@contextmanager
def _cache_under_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep the cache argument (transformers drops it by default, since a
    plain cache would be written twice on the replay; ``_PrefixRecorder``/``_PrefixReader`` are
    safe to replay). Needs non-reentrant checkpointing (``engine`` uses it): the prefix's keys
    and values leave the layer through the cache, not through its output."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    before = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            if b is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = b


def _pick_rows(batch: dict[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of a collated batch (pixel patches taken per image)."""
    parts = [slice_batch(batch, r, r + 1) for r in rows]
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def row_groups(rows: range, group: int) -> tuple[list[int], list[int]]:
    """For the rows ``rows`` of a GRPO batch (row r shows prompt ``r // group``): the index within
    ``rows`` of each prompt's first row, and how many of its rows ``rows`` holds (whole groups:
    ``group`` each; a micro-batch that splits a group holds a part of it)."""
    prompts = prompts_of_rows(rows, group)
    starts = [max(rows.start, p * group) for p in prompts]
    stops = [min(rows.stop, (p + 1) * group) for p in prompts]
    return [a - rows.start for a in starts], [b - a for a, b in zip(starts, stops)]


def shared_prefix_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    rows: range,
    group: int,
    *,
    temperature: float,
    suppress_token_ids: Sequence[int] = (),
    prompt_features: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``completion_logprobs`` of ``batch`` (rows ``rows`` of a GRPO batch, row r showing prompt
    ``r // group``), each prompt through the language model once (grad flows if enabled).

    Two forwards of ``model`` (the engine's, so ZeRO-3 gathers parameters as for any forward):

    1. **prefix**: the b prompts of these rows (the first row of each; left-padded to the batch's
       P) with their images, keeping every layer's keys/values (``_PrefixRecorder``, with grad)
       and the logits of the last prompt position, which predict completion token 0;
    2. **completions**: completion tokens 0..L-2 of the n rows ``[n, L-1]`` attending to their
       prompt's keys/values, repeated per row along the batch (``repeat_interleave``: the
       gradients of all rows flow into the one prefix) and read only (``_PrefixReader``); their
       logits predict tokens 1..L-1. Positions are the rollout's (``batch["position_ids"]``,
       ``generation.sequence_positions``) and the attention mask is prompt mask + completion
       mask, as in the forward over prompt + completion.

    Tokens through the language model: b*P + n*(L-1) instead of n*(P+L). Equal to
    ``completion_logprobs`` up to float rounding (tests/integration/test_shared_prefix.py).
    ``prompt_features``: one tensor per prompt of these rows (``prompts_of_rows``), the vision
    features to use instead of the tower (same contract as ``completion_logprobs``).
    """
    if "position_ids" not in batch:
        raise KeyError("shared_prefix_logprobs needs batch['position_ids'] [n, 3, P+L] "
                       "(generation.sequence_positions, set by the rollout)")
    text = getattr(model, "module", model).config.get_text_config(decoder=True)
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        raise ValueError("grpo.shared_prefix_update: sliding-window attention layers are not "
                         "supported (their cache drops keys); set grpo.shared_prefix_update=false")
    mask = batch["completion_mask"]  # [n, L]
    n, length = mask.shape
    if n != len(rows):
        raise ValueError(f"batch has {n} rows but rows={rows} names {len(rows)}")
    p = batch["input_ids"].shape[1] - length  # P
    device = next(model.parameters()).device
    firsts, counts = row_groups(rows, group)
    counts_t = torch.as_tensor(counts, device=device)  # [b]
    head = _pick_rows(batch, firsts)  # b rows: one per prompt
    prefix = {
        "input_ids": head["input_ids"][:, :p],  # [b, P]
        "attention_mask": head["attention_mask"][:, :p],  # [b, P]
        "mm_token_type_ids": head["mm_token_type_ids"][:, :p],  # [b, P]
        "image_grid_thw": head["image_grid_thw"],  # [b, 3]
        "position_ids": head["position_ids"][:, :, :p].transpose(0, 1),  # [3, b, P]
    }
    prefix = {k: v.to(device) for k, v in prefix.items()}
    if prompt_features is not None:
        if len(prompt_features) != len(firsts):
            raise ValueError(f"{len(prompt_features)} prompt features for the {len(firsts)} "
                             f"prompts of rows {rows} (group {group})")
        prefix["mm_encoder_outputs"] = encoder_outputs(prompt_features)
    else:
        prefix["pixel_values"] = head["pixel_values"].to(device)
    ids = batch["input_ids"][:, -length:].to(device)  # [n, L]
    with _cache_under_checkpointing(model):
        kv = Cache(layer_class_to_replicate=_PrefixRecorder)
        first = model(**prefix, past_key_values=kv, use_cache=True,
                      logits_to_keep=1).logits  # [b, 1, V]
        logits = [first.repeat_interleave(counts_t, dim=0)]  # [n, 1, V]
        if length > 1:
            reader = Cache(layers=[
                _PrefixReader(layer.keys.repeat_interleave(counts_t, dim=0),
                              layer.values.repeat_interleave(counts_t, dim=0))
                for layer in kv.layers])  # [n, heads, P, d] per layer
            rest = model(
                input_ids=ids[:, :-1],  # [n, L-1]
                attention_mask=batch["attention_mask"][:, : p + length - 1].to(device),  # [n, P+L-1]
                position_ids=batch["position_ids"][:, :, p: p + length - 1].to(device)
                .transpose(0, 1),  # [3, n, L-1]
                past_key_values=reader, use_cache=True,
            ).logits  # [n, L-1, V]
            logits.append(rest)
    logits = torch.cat(logits, dim=1)  # [n, L, V]
    banned = ban_mask(logits.shape[-1], suppress_token_ids, logits.device)  # [V]
    return sampled_token_logprobs(logits, ids, temperature=temperature, banned=banned)  # [n, L]
