"""One generation path: G completions per prompt for GRPO, evaluation and the sparsity probe.

Dimension names (DESIGN.md): B prompts, G samples per prompt, N = B*G rows, P prompt tokens
(left-padded), L completion tokens, V vocabulary, H hidden size, K = P + max_new_tokens cache slots.

What it does, and why it is faster than ``model.generate`` on ``repeat_prompts(batch, G)``:

1. **Vision once per image.** The vision tower runs on the B images, not on N copies of them
   (``image_features``). The features are returned, so the forwards of the update can reuse them
   (``medloc.models.logprobs.completion_logprobs(..., image_features=...)``) instead of running the
   tower again for the reference, the old policy and the policy.
2. **Prompt prefilled once, shared by the G samples.** The B prompts go through the language model
   once; their key/value cache is then repeated G times along the batch (each prompt's G samples
   share the same prefix, so the copies are exact).
3. **Pre-allocated (static) KV cache** of K slots per row (``cache="static"``, the default): no
   per-token ``torch.cat`` of every layer's cache, fixed shapes for a compiled decode step.
   ``cache="dynamic"`` keeps transformers' growing cache (same arithmetic up to the masked slots).
   With the static cache a decode step calls the decoder layers directly, with the step's
   attention mask and rotary embeddings taken from tables built once per call
   (``_static_decode_inputs``), instead of the language model's forward rebuilding both for every
   token (same values bit for bit).

   **The attention mask follows transformers' contract for every attention implementation**: the
   2-D mask handed to the language model covers the tokens seen so far plus the query, never a
   cache slot not written yet. The prefill gets the prompt mask ``[B, P]`` (sdpa with the static
   cache keeps its former ``[B, K]`` form, see ``_prefill_mask``); decode step t gets
   ``[N, K]`` with 1 only on real prompt tokens and the completion slots written so far
   (``written_masks``). This matters for flash attention: ``masking_utils.flash_attention_mask``
   returns None for a mask of ones at the cache length, and flash-attn then attends to every
   slot of the static cache, zeros included, and aligns the prefill's causal mask bottom-right
   against all K slots. (sdpa and eager build the same boolean mask from either form: for them
   the causal rule hid the unwritten slots.)
4. **Sampling in a few tensor ops per step**: temperature, the vision-token ban (a [V] boolean mask
   built once) and top-p (sort + cumulative sum) on the [N, V] logits, then one
   ``torch.multinomial`` over all rows; no per-token Python over the vocabulary. Rows that reached
   EOS emit the pad token; the loop checks for "all rows done" only every ``sync_every`` steps (a
   host synchronisation), trimming the extra columns afterwards.
5. **Optional compiled decode step** (``compile_decode=True``, needs the static cache): the
   one-token language-model step goes through ``torch.compile(mode="reduce-overhead")``, i.e.
   CUDA graphs on a GPU. Compiled steps are kept per graph shape (``compile_key``), the cache
   length K is rounded up to a multiple of ``COMPILE_CACHE_MULTIPLE`` so that batches whose
   prompts differ in length reuse one graph, and the decode cache is written in place into the
   previous call's (``_decode_cache``) so that CUDA graphs are not re-recorded every rollout.

Exactness: positions are Qwen2.5-VL's M-RoPE positions (``get_rope_index`` on the prompt, then
``max position + 1 + t`` for completion token t, which is what the training forward computes over
prompt + completion; ``sequence_positions`` hands them to the update's forwards), so the
log-probabilities of the sampled tokens under the sampling distribution equal those of the
training forward (``completion_logprobs``) to float rounding; ``tests/integration/test_generation.py``
checks it. The random stream is torch's global generator
(one ``multinomial`` call over the N rows per step, like ``generate``), so ``runtime.seed_step``
makes rollouts reproducible.

Nothing here knows DeepSpeed, rewards or the curriculum: under ZeRO-3 the caller hands in a model
whose parameters are gathered (``Engine.generation_context``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import is_flash_attention_requested

KVCache = Literal["static", "dynamic"]


@dataclass
class Generation:
    """What ``generate`` returns (all on CPU except ``image_features``)."""

    completion_ids: Tensor  # [N, L] long; rows that stopped are padded with pad_id after EOS
    logprobs: Tensor  # [N, L] float32: each token's log-prob (next_tokens); 0 after EOS
    image_features: tuple[Tensor, ...]  # B tensors [tokens_i, H] on the model's device, no grad
    # M-RoPE positions of the B prompts [3, B, P] (0 on padding) and each prompt's first
    # completion position [B], on CPU: ``sequence_positions`` extends them over the completions.
    prompt_positions: Tensor | None = None
    next_positions: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# pieces of the forward, each used once per prompt batch
# ---------------------------------------------------------------------------------------------


def image_features(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """Run the vision tower (patch embed, blocks, 2x2 merger) once per image of ``batch``.

    ``batch`` holds ``pixel_values`` [S, D] and ``image_grid_thw`` [B, 3] of B images (one per
    prompt). Returns B tensors ``[t*h*w/4, H]``: image i's features, in placeholder order.
    """
    device = next(model.parameters()).device
    out = model.model.get_image_features(
        batch["pixel_values"].to(device), batch["image_grid_thw"].to(device), return_dict=True
    )
    return tuple(out.pooler_output)


def encoder_outputs(features: Sequence[Tensor]) -> dict[str, BaseModelOutputWithPooling]:
    """Precomputed image features in the form Qwen2.5-VL's forward takes (``mm_encoder_outputs``)."""
    return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}


def rows_features(features: Sequence[Tensor], rows: range, group: int) -> list[Tensor]:
    """Features of the image of each row in ``rows`` when row r belongs to prompt ``r // group``."""
    return [features[r // group] for r in rows]


def prompt_embeddings(model: torch.nn.Module, input_ids: Tensor, features: Sequence[Tensor]
                      ) -> Tensor:
    """Token embeddings of the prompts [B, P, H] with the image features put on the placeholders."""
    embeds = model.get_input_embeddings()(input_ids)  # [B, P, H]
    feats = torch.cat(list(features), dim=0).to(embeds.dtype)  # [tokens, H]
    image_mask = (input_ids == model.config.image_token_id)[..., None]  # [B, P, 1]
    if int(image_mask.sum()) != feats.shape[0]:
        raise ValueError(
            f"{int(image_mask.sum())} image placeholders in the prompts but {feats.shape[0]} "
            "image feature vectors: one image per prompt, processed with the same processor?"
        )
    return embeds.masked_scatter(image_mask, feats)  # [B, P, H]


def prompt_positions(model: torch.nn.Module, batch: dict[str, Tensor], device: torch.device
                     ) -> tuple[Tensor, Tensor]:
    """M-RoPE positions of the prompts ``[3, B, P]`` and each prompt's next text position ``[B]``.

    Padding gets position 0 (masked anyway). Completion token t of prompt b sits at
    ``next_pos[b] + t`` on all three M-RoPE axes: text after the image continues from the largest
    position used so far, exactly as ``get_rope_index`` numbers prompt + completion in training.
    """
    positions, _ = model.model.get_rope_index(
        batch["input_ids"].to(device),
        mm_token_type_ids=batch["mm_token_type_ids"].to(device),
        image_grid_thw=batch["image_grid_thw"].to(device),
        attention_mask=batch["attention_mask"].to(device),
    )  # [3, B, P]
    next_pos = positions.amax(dim=(0, 2)) + 1  # [B]
    return positions, next_pos


def sequence_positions(prompt_positions: Tensor, next_positions: Tensor, completion_mask: Tensor,
                       repeat: int) -> Tensor:
    """M-RoPE positions ``[N, 3, P+L]`` of a prompt+completion batch (``collate.append_completions``
    with the same ``repeat``), rows first so that ``collate.slice_batch`` slices them.

    What ``get_rope_index`` computes on that batch (the training forward passes them instead of
    recomputing them row by row): the prompt's positions, then ``next_positions[b] + t`` on all
    three axes for kept completion token t, and 0 wherever the attention mask is 0 (prompt padding,
    tokens after EOS).
    """
    mask = completion_mask.to(torch.long)  # [N, L]
    steps = torch.arange(mask.shape[1], dtype=torch.long)  # [L]
    completion = (next_positions.repeat_interleave(repeat)[:, None] + steps) * mask  # [N, L]
    prompt = prompt_positions.permute(1, 0, 2).repeat_interleave(repeat, dim=0)  # [N, 3, P]
    return torch.cat([prompt, completion[:, None, :].expand(-1, 3, -1)], dim=2)  # [N, 3, P+L]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def ban_mask(vocab_size: int, banned: Sequence[int], device: torch.device) -> Tensor:
    """[V] boolean mask, True on the token ids generation must never produce."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if len(banned):
        mask[torch.as_tensor(list(banned), dtype=torch.long, device=device)] = True
    return mask


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filter on [N, V] scores: keep the smallest set of most probable tokens whose
    probability reaches ``top_p`` (at least one token); the rest get -inf.

    Ascending sort, so a token is dropped when the probability mass of the tokens at or below it
    is <= 1 - top_p (the convention of transformers' ``TopPLogitsWarper``: ties at the boundary
    are resolved the same way, so samples agree with ``generate``).
    """
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1)  # [N, V] ascending
    mass_below = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
    drop_sorted = mass_below <= 1.0 - top_p  # [N, V]
    drop_sorted[..., -1] = False  # the most probable token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # [N, V] back in vocabulary order
    return scores.masked_fill(drop, float("-inf"))


def next_tokens(logits: Tensor, *, banned: Tensor, do_sample: bool, temperature: float,
                top_p: float) -> tuple[Tensor, Tensor]:
    """One token per row from float32 logits [N, V], and its log-probability.

    Ban, then temperature and top-p, then one ``multinomial`` draw over all rows from the softmax
    (or the arg-max when ``do_sample=False``, at temperature 1). The log-probability returned is
    that of ``softmax(logits / temperature)`` with the banned tokens removed and WITHOUT the top-p
    cut: the quantity ``completion_logprobs`` computes in the training forward.
    """
    scores = logits.masked_fill(banned, float("-inf"))  # [N, V]
    if do_sample:
        scores = scores / temperature
        tok = torch.multinomial(top_p_filter(scores, top_p).softmax(dim=-1), num_samples=1)
    else:
        tok = scores.argmax(dim=-1, keepdim=True)
    logp = scores.log_softmax(dim=-1).gather(-1, tok).squeeze(1)  # [N]
    return tok.squeeze(1), logp  # [N], [N]


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def _new_cache(model: torch.nn.Module, cache: str, max_len: int) -> Any:
    if cache == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if cache == "dynamic":
        return DynamicCache(config=model.config.get_text_config(decoder=True))
    raise ValueError(f"cache={cache!r}: expected one of {get_args(KVCache)}")


def _repeat_cache(kv: Any, repeat: int, static: bool) -> None:
    """Repeat every layer's keys/values ``repeat`` times along the batch (row b -> rows b*G..)."""
    if repeat == 1:
        return
    if not static:
        kv.batch_repeat_interleave(repeat)
        return
    for layer in kv.layers:
        layer.keys = layer.keys.repeat_interleave(repeat, dim=0)  # [N, heads, K, head_dim]
        layer.values = layer.values.repeat_interleave(repeat, dim=0)
        layer.batch_size = layer.keys.shape[0]
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


def _lm_logits(model: torch.nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor,
               kv: Any) -> Tensor:
    """Last-position float32 logits [n, V] of one language-model call that extends ``kv``."""
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
        past_key_values=kv, use_cache=True,
    ).last_hidden_state  # [n, q, H]
    return model.lm_head(hidden[:, -1]).float()  # [n, V]


def written_masks(full_mask: Tensor, prompt_len: int, steps: int) -> Tensor:
    """Boolean attention masks ``[steps, N, K]`` of the decode steps with a static cache.

    Step t feeds the token sampled at t into cache slot ``prompt_len + t``: its mask is
    ``full_mask`` (real prompt tokens and completion slots) restricted to the slots written so far
    plus that query, ``slot <= prompt_len + t``: the 2-D mask of the tokens seen so far that
    transformers expects, at the fixed length K of the cache.
    """
    k = full_mask.shape[1]
    slots = torch.arange(k, device=full_mask.device)  # [K]
    written = slots[None, :] <= (prompt_len + torch.arange(steps, device=full_mask.device))[:, None]
    return full_mask.bool()[None] & written[:, None, :]  # [steps, N, K]


def _static_decode_inputs(model: torch.nn.Module, full_mask: Tensor, next_pos: Tensor,
                          prompt_len: int, steps: int, *, flash: bool = False
                          ) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """What the decode steps of a static cache need besides the token, built once for all steps.

    Step t feeds the token sampled at t into cache slot ``prompt_len + t`` at M-RoPE position
    ``next_pos + t`` (all three axes). Returns, per step, the attention mask in the form the
    layers' attention takes it and the rotary ``(cos, sin)`` ``[N, 1, head_dim]``: the same values
    the language model's own forward builds each step (``create_causal_mask``, ``rotary_emb``), so
    the logits are bitwise those of ``_lm_logits`` while the per-step Python of mask and rotary
    creation is gone. The mask: for sdpa the boolean ``[N, 1, 1, K]`` (True = attend: a real
    prompt token or a completion slot already written) that ``sdpa_mask`` builds; for flash
    attention (``flash=True``) the 2-D ``[N, K]`` step mask itself, which is what
    ``flash_attention_mask`` returns for it (never None: slot K-1 is never written before the
    last step, so no step mask is all ones).
    """
    n = full_mask.shape[0]
    step_masks = written_masks(full_mask, prompt_len, steps)  # [steps, N, K]
    masks = step_masks if flash else step_masks[:, :, None, None, :]  # [steps, N, (1, 1,) K]
    positions = (next_pos[:, None] + torch.arange(steps, device=next_pos.device))  # [N, steps]
    positions = positions[None].expand(3, n, steps)  # [3, N, steps]
    lm = model.model.language_model
    dtype = lm.embed_tokens.weight.dtype
    cos, sin = lm.rotary_emb(torch.empty(0, device=full_mask.device, dtype=dtype), positions)
    rotary = [(cos[:, t : t + 1].contiguous(), sin[:, t : t + 1].contiguous())  # [N, 1, head_dim]
              for t in range(steps)]
    return list(masks.unbind(0)), rotary


def _decode_logits(model: torch.nn.Module, embeds: Tensor, mask: Tensor,
                   rotary: tuple[Tensor, Tensor], kv: Any) -> Tensor:
    """One decode step with a static cache: float32 logits [N, V] of one token per row.

    The decoder layers are called directly with the step's precomputed mask and rotary
    embeddings (``_static_decode_inputs``): the same layer calls the language model's forward
    makes, without rebuilding the mask and the rotary table every token.
    """
    lm = model.model.language_model
    hidden = embeds  # [N, 1, H]
    for layer in lm.layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary,
                       past_key_values=kv, use_cache=True)
    return model.lm_head(lm.norm(hidden)[:, -1]).float()  # [N, V]


def _prefill_mask(model: torch.nn.Module, prompt_mask: Tensor, full_mask: Tensor, static: bool
                  ) -> Tensor:
    """The prefill's 2-D attention mask: the prompt mask ``[B, P]`` (transformers' contract, the
    tokens seen so far plus the query), except for sdpa with the static cache, which keeps
    ``full_mask`` ``[B, K]`` (ones on the completion slots) as before: with an empty cache sdpa's
    causal rule already hides those slots, so the attention is the same, but the prompt mask of
    an unpadded batch lets transformers swap the explicit mask for sdpa's ``is_causal`` flag,
    which rounds differently (measured: 4.8e-7 on a log-prob of a single-prompt batch), and the
    sdpa numbers stay bit-identical to what they were. Flash attention needs the prompt mask
    (with ``[B, K]`` it would align the prompt's queries with the last P slots)."""
    if static and model.config.get_text_config(decoder=True)._attn_implementation == "sdpa":
        return full_mask  # [B, K]
    return prompt_mask  # [B, P]


def _flash_attention(model: torch.nn.Module) -> bool:
    """Whether the language model runs a flash-attention implementation (transformers' own test:
    "flash" in the implementation's name, the rule its mask and generation code branch on)."""
    return is_flash_attention_requested(model.config.get_text_config(decoder=True))


def _fast_decode_ok(model: torch.nn.Module) -> bool:
    """The direct layer loop reproduces the language model's forward for full-attention layers
    under sdpa (one boolean mask for all layers) and flash attention (one 2-D mask, no position
    ids: the forward passes none for 3-axis M-RoPE positions); anything else (sliding windows,
    eager attention's additive float mask) goes through the model's own forward."""
    text = model.config.get_text_config(decoder=True)
    return (all(t == "full_attention" for t in getattr(text, "layer_types", ["full_attention"]))
            and (text._attn_implementation == "sdpa" or _flash_attention(model)))


# A compiled step is specialised to the shapes of its inputs; K (prompt + max_new_tokens cache
# slots) changes with every batch's longest prompt. With compile_decode the cache length is
# rounded up to a multiple of this, so batches whose prompts differ by less share one graph (a
# rounded-up slot is never written and always masked; it costs at most this many extra slots).
COMPILE_CACHE_MULTIPLE = 64

_COMPILED: dict[tuple, Any] = {}


def compile_key(fast: bool, model: torch.nn.Module, rows: int, cache_len: int) -> tuple:
    """What a compiled decode step's graph depends on: the function (the direct layer loop or the
    language model's forward), the attention implementation (different kernels, masks and graph
    breaks), the rows N and cache length K (the shapes of the cache, the mask and every
    activation), the parameters' dtype and device. Calls with equal keys replay one graph; a new
    key is a new compilation (and, on a GPU, new CUDA graphs)."""
    text = model.config.get_text_config(decoder=True)
    param = next(model.parameters())
    geometry = (text.num_hidden_layers, text.num_key_value_heads,
                text.hidden_size // text.num_attention_heads)  # the cache's layers, heads, head_dim
    return ("fast" if fast else "step", str(text._attn_implementation), int(rows), int(cache_len),
            param.dtype, str(param.device), geometry)


_DECODE_CACHE: dict[tuple, Any] = {}


def _decode_cache(prefilled: Any, repeat: int, key: tuple) -> Any:
    """The static cache a compiled decode step runs on: ``prefilled`` (B rows) repeated
    ``repeat`` times along the batch, written IN PLACE into the cache of the previous call when
    that call had the same ``compile_key``. A static cache is a fixed-address input of the CUDA
    graphs (``mark_static_address``): a new cache tensor every call would make them re-record at
    every rollout, and after ``torch._inductor.config.triton.cudagraph_unexpected_rerecord_limit``
    re-records stop using graphs for the step. Only the last key's cache is kept (a new key is a
    new graph, recorded anyway): under ``compile_decode`` one N x K cache stays allocated between
    rollouts."""
    kept = _DECODE_CACHE.get(key)
    if kept is None:
        _DECODE_CACHE.clear()
        _repeat_cache(prefilled, repeat, static=True)
        _DECODE_CACHE[key] = prefilled
        return prefilled
    for src, dst in zip(prefilled.layers, kept.layers, strict=True):
        b = src.keys.shape[0]
        dst.keys.view(b, repeat, *dst.keys.shape[1:]).copy_(src.keys[:, None])  # [B, G, heads, K, d]
        dst.values.view(b, repeat, *dst.values.shape[1:]).copy_(src.values[:, None])
        dst.cumulative_length.copy_(src.cumulative_length)
    return kept


def compiled_cache_len(prompt_len: int, max_new_tokens: int, compile_decode: bool) -> int:
    """K, the static cache's slots: ``prompt_len + max_new_tokens``, rounded up to a multiple of
    ``COMPILE_CACHE_MULTIPLE`` when the decode step is compiled (see there)."""
    k = prompt_len + max_new_tokens
    if not compile_decode:
        return k
    return -(-k // COMPILE_CACHE_MULTIPLE) * COMPILE_CACHE_MULTIPLE


def _decode_fn(compile_decode: bool, fast: bool, key: tuple | None = None) -> Any:
    """The decode step: ``_decode_logits`` (fast) or ``_lm_logits``; with ``compile_decode`` one
    ``torch.compile`` wrapper per ``compile_key`` (dynamo guards on the same shapes; keying here
    makes each graph a separate, countable entry instead of one entry per function that
    recompiles, then turns its shapes dynamic, behind the caller's back)."""
    fn = _decode_logits if fast else _lm_logits
    if not compile_decode:
        return fn
    if key is None:
        raise ValueError("compile_decode=True needs the step's compile_key")
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, mode="reduce-overhead", fullgraph=False)
    return _COMPILED[key]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_batch: dict[str, Tensor],
    *,
    num_samples: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    banned_token_ids: Sequence[int] = (),
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    cache: str = "static",
    compile_decode: bool = False,
    sync_every: int = 4,
    features: Sequence[Tensor] | None = None,
    min_new_tokens: int = 0,
) -> Generation:
    """Sample ``num_samples`` (G) completions for each of the B prompts of ``prompt_batch``.

    ``prompt_batch`` comes from ``collate.encode_prompts`` (B rows, left-padded, not repeated).
    Returns the completions ``[B*G, L]`` (the G samples of prompt b in rows b*G .. b*G+G-1, the
    order of ``repeat_prompts``; L <= max_new_tokens, the loop stops once every row emitted EOS)
    and the B prompts' image features (pass ``features`` to reuse ones computed before).
    ``min_new_tokens``: EOS is banned for the first that many tokens (benchmarks use it to force
    equal-length completions; the returned log-probs then count EOS as banned there too).
    """
    if cache not in get_args(KVCache):
        raise ValueError(f"cache={cache!r}: expected one of {get_args(KVCache)}")
    if compile_decode and cache != "static":
        raise ValueError("compile_decode=True needs cache='static' (fixed shapes)")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must be >= 1")
    device = next(model.parameters()).device
    g = num_samples
    input_ids = prompt_batch["input_ids"].to(device)  # [B, P]
    prompt_mask = prompt_batch["attention_mask"].to(device)  # [B, P]
    b, p = input_ids.shape
    n, k = b * g, compiled_cache_len(p, max_new_tokens, compile_decode)
    eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                          device=device)
    banned = ban_mask(model.lm_head.out_features, banned_token_ids, device)  # [V]
    banned_early = banned.clone()  # [V], for the first min_new_tokens steps: EOS banned too
    banned_early[eos] = True

    # 1-2. vision once per image, prompt prefilled once per prompt
    feats = tuple(features) if features is not None else image_features(model, prompt_batch)
    embeds = prompt_embeddings(model, input_ids, feats)  # [B, P, H]
    positions, next_pos = prompt_positions(model, prompt_batch, device)  # [3, B, P], [B]
    static = cache == "static"
    kv = _new_cache(model, cache, k)
    # The prefill's mask is the prompt's (the tokens seen so far plus the query, for every
    # attention implementation and cache: see the module docstring). full_mask: real prompt
    # tokens and completion slots over all K slots; each decode step restricts it to the slots
    # written so far (written_masks), at the fixed length K with the static cache.
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, k - p)], dim=1)  # [B, K]
    logits = _lm_logits(model, embeds, _prefill_mask(model, prompt_mask, full_mask, static),
                        positions, kv)  # [B, V]

    # 3. the cache (and what else is per prompt) repeated for the G samples
    if compile_decode:  # static: checked above
        key = compile_key(_fast_decode_ok(model), model, n, k)
        kv = _decode_cache(kv, g, key)
    else:
        _repeat_cache(kv, g, static)
    logits = logits.repeat_interleave(g, dim=0)  # [N, V]
    full_mask = full_mask.repeat_interleave(g, dim=0)  # [N, K]
    next_pos = next_pos.repeat_interleave(g, dim=0)  # [N]
    embed = model.get_input_embeddings()
    fast = static and _fast_decode_ok(model)
    step_fn = _decode_fn(compile_decode, fast, key if compile_decode else None)
    if fast:
        step_masks, step_rotary = _static_decode_inputs(model, full_mask, next_pos, p,
                                                        max_new_tokens - 1,
                                                        flash=_flash_attention(model))
    elif static:
        step_masks = list(written_masks(full_mask, p, max_new_tokens - 1).unbind(0))  # [N, K] each

    # 4. decode
    out = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # [N, Lmax]
    out_logp = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)  # [N, Lmax]
    done = torch.zeros(n, dtype=torch.bool, device=device)  # [N]
    length = max_new_tokens
    for t in range(max_new_tokens):
        tok, logp = next_tokens(logits, banned=banned_early if t < min_new_tokens else banned,
                                do_sample=do_sample,
                                temperature=temperature, top_p=top_p)  # [N], [N]
        tok = tok.masked_fill(done, pad_token_id)
        out[:, t] = tok
        out_logp[:, t] = logp.masked_fill(done, 0.0)
        done = done | torch.isin(tok, eos)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % sync_every == 0 and bool(done.all()):
            length = t + 1
            break
        if fast:
            logits = step_fn(model, embed(tok[:, None]), step_masks[t], step_rotary[t], kv)  # [N, V]
            continue
        pos = (next_pos + t).view(1, n, 1).expand(3, n, 1)  # [3, N, 1]
        mask = step_masks[t] if static else full_mask[:, : p + t + 1]  # [N, K] or [N, P+t+1]
        logits = step_fn(model, embed(tok[:, None]), mask, pos, kv)  # [N, V]
    out, out_logp = out[:, :length], out_logp[:, :length]
    # The loop looks at `done` only every sync_every steps: drop the columns after the step at
    # which the last row finished, as generate() would have stopped there.
    finished_at = torch.where(
        torch.isin(out, eos), torch.arange(out.shape[1], device=device), out.shape[1]
    ).amin(dim=1)  # [N] index of each row's first EOS (L if none)
    if bool((finished_at < out.shape[1]).all()):
        out = out[:, : int(finished_at.max()) + 1]
        out_logp = out_logp[:, : out.shape[1]]
    return Generation(completion_ids=out.cpu(), logprobs=out_logp.cpu(), image_features=feats,
                      prompt_positions=positions.cpu(), next_positions=next_pos[::g].cpu())
