"""flash_attention_2 on a CPU: transformers' own FA2 path with the two flash-attn kernels replaced
by pure-torch functions that keep their contract.

Flash-attn has no CPU build, so nothing in the CPU suite would ever run the code transformers
executes for ``attn_implementation="flash_attention_2"``. That code does two things that matter
for correctness and that no sdpa/eager test can show:

- **the mask**: ``masking_utils.flash_attention_mask`` hands the attention a 2-D ``[batch, kv]``
  padding mask, or ``None`` when that mask is all ones at the kv length;
- **the unpadding**: ``modeling_flash_attention_utils._flash_attention_forward`` then either
  (mask given) cuts the keys to the mask's length, keeps the keys where the mask is 1, keeps the
  queries with the same indices (q = kv), all queries (q = 1) or those of the last q mask columns
  (otherwise, assuming left padding), and calls ``flash_attn_varlen_func``; or (varlen kwargs
  ``cu_seq_lens_*``, as the vision tower passes them) calls the varlen kernel on the flattened
  rows; or (``position_ids`` of one row that restart, ``_is_packed_sequence``) builds the
  sequence boundaries from them; or (none of these) calls ``flash_attn_func`` on the whole
  ``[batch, q]`` x ``[batch, kv]`` tensors -- every key of the cache tensor is attended.

What this module does, and what it does not:

- It **registers transformers' own** ``integrations.flash_attention.flash_attention_forward``
  under :data:`NAME` (``AttentionInterface.register``) and transformers' own
  ``flash_attention_mask`` for it (``AttentionMaskInterface.register``). So the model builds its
  masks exactly as for ``"flash_attention_2"``, and every branch above is transformers' code,
  not a copy of it.
- The name contains "flash", so every ``is_flash_attention_requested`` check of transformers
  (the vision tower's packed ``cu_seqlens`` path, ``generate``'s "keep the mask under FA + static
  cache" rule, ``get_max_seqlen``) and of medloc (``generation._flash_attention``) treats the model
  as flash attention; ``_check_and_adjust_attn_implementation`` accepts it because it is a
  registered key that is not literally ``flash_attention_<digit>``.
- The kernels: transformers fetches them through ``lazy_import_flash_attention(name)``, which
  returns module globals of ``modeling_flash_attention_utils`` once ``_loaded_implementation ==
  name``. :func:`installed` sets those globals to :func:`flash_attn_varlen_func` and
  :func:`flash_attn_func` below (and transformers' pure-torch ``_pad_input``/``_unpad_input``,
  which it uses for FA3 and documents as equal to flash-attn's ``bert_padding`` ones), and puts
  everything back on exit.
- Kernel contract emulated (flash-attn 2.x, ``flash_attn_interface``): ``causal=True`` aligns the
  causal mask **bottom-right** per sequence -- query i of a sequence with q queries and k keys sees
  keys j <= i + k - q; a query that sees no key outputs 0; grouped-query attention maps query head
  h to key/value head h // (Hq / Hk); ``softmax_scale`` default 1/sqrt(head_dim); softmax in
  float32, output in the input dtype.
- Not emulated (each raises ``NotImplementedError`` if reached, so a test cannot silently pass
  through it): dropout > 0, sliding windows (``window_size``), softcap, ALiBi, attention sinks,
  ``return_attn_probs``, and the paged-cache kernel ``flash_attn_with_kvcache`` (only reached
  with continuous batching's ``block_table``, which medloc never uses). Numerics are those of an
  fp32 softmax, not of the tiled online softmax of the CUDA kernel (rounding differs at the 1e-3
  level in bf16; the tests here compare implementations against themselves, not against sdpa).
- ``integrations.flash_attention._use_top_left_mask`` is False on a CPU, as it is with
  flash-attn >= 2.1 on a GPU (:func:`installed` checks it).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers import modeling_flash_attention_utils as fa_utils
from transformers.integrations import flash_attention as fa_integration
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

NAME = "flash_attention_2_emulated"

_GLOBALS = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn",
            "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")


def _unsupported(**features: object) -> None:
    for name, value in features.items():
        if value:
            raise NotImplementedError(f"the emulated flash-attn kernel does not implement {name}={value!r}")


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hk, D] -> [Sq, Hq, D], flash-attn's semantics."""
    sq, hq, _ = q.shape
    sk, hk, _ = k.shape
    if hq % hk:
        raise ValueError(f"{hq} query heads are not a multiple of {hk} key/value heads")
    k = k.repeat_interleave(hq // hk, dim=1)  # [Sk, Hq, D]
    v = v.repeat_interleave(hq // hk, dim=1)  # [Sk, Hq, Dv]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [Hq, Sq, Sk]
    if causal:
        seen = (torch.arange(sk, device=q.device)[None, :]
                <= torch.arange(sq, device=q.device)[:, None] + (sk - sq))  # [Sq, Sk] bottom-right
        scores = scores.masked_fill(~seen, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key outputs 0
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)  # [Sq, Hq, Dv]


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: float | None = None,
                           causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                           deterministic: bool = False, return_attn_probs: bool = False,
                           block_table: Tensor | None = None) -> Tensor:
    """``flash_attn.flash_attn_varlen_func``: q [total_q, Hq, D], k/v [total_k, Hk, D]; sequence
    i is rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q and ``cu_seqlens_k[i]:..`` of k/v (rows of
    k/v after ``cu_seqlens_k[-1]`` are not read). Returns [total_q, Hq, Dv], 0 on rows of q
    outside every sequence."""
    _unsupported(dropout_p=dropout_p, window_size=tuple(window_size) != (-1, -1), softcap=softcap,
                 alibi_slopes=alibi_slopes is not None, return_attn_probs=return_attn_probs,
                 block_table=block_table is not None)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq)} entries, cu_seqlens_k {len(ck)}")
    lens_q = [b - a for a, b in itertools.pairwise(cq)]
    lens_k = [b - a for a, b in itertools.pairwise(ck)]
    if max(lens_q, default=0) > int(max_seqlen_q) or max(lens_k, default=0) > int(max_seqlen_k):
        raise ValueError(f"max_seqlen_q/k={max_seqlen_q}/{max_seqlen_k} below the longest "
                         f"sequence {max(lens_q)}/{max(lens_k)} (the kernel would read garbage)")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])  # [total_q, Hq, Dv]
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(cq), itertools.pairwise(ck)):
        if q1 > q0:
            out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal)
    return out


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False) -> Tensor:
    """``flash_attn.flash_attn_func``: q [B, Sq, Hq, D], k/v [B, Sk, Hk, D] -> [B, Sq, Hq, Dv];
    every key of every row is attended (bottom-right causal when ``causal``)."""
    _unsupported(dropout_p=dropout_p, window_size=tuple(window_size) != (-1, -1), softcap=softcap,
                 alibi_slopes=alibi_slopes is not None, return_attn_probs=return_attn_probs)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


@contextlib.contextmanager
def installed() -> Iterator[str]:
    """Register :data:`NAME` (attention + mask) and install the emulated kernels; yields NAME.

    Everything changed is put back on exit: the interfaces' entries and transformers' kernel
    globals, so the rest of the process sees transformers as it was.
    """
    if fa_integration._use_top_left_mask:
        raise RuntimeError("transformers aligns FA2's causal mask top-left here (an old flash-attn "
                           "or an NPU): the emulation's bottom-right kernel would not match it")
    saved = {name: getattr(fa_utils, name) for name in _GLOBALS}
    AttentionInterface.register(NAME, fa_integration.flash_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    fa_utils._flash_fn = flash_attn_func
    fa_utils._flash_varlen_fn = flash_attn_varlen_func
    fa_utils._flash_with_kvcache_fn = None
    fa_utils._pad_fn, fa_utils._unpad_fn = fa_utils._pad_input, fa_utils._unpad_input
    fa_utils._process_flash_kwargs_fn = fa_utils._lazy_define_process_function(flash_attn_varlen_func)
    fa_utils._process_with_kvcache_kwargs_fn = dict
    fa_utils._loaded_implementation = NAME
    try:
        yield NAME
    finally:
        for name, value in saved.items():
            setattr(fa_utils, name, value)
        AttentionInterface._global_mapping.pop(NAME, None)
        AttentionMaskInterface._global_mapping.pop(NAME, None)


def use(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded model (and its vision/text sub-models) to :data:`NAME` through
    ``set_attn_implementation`` (transformers' own checks run). Needs :func:`installed` active."""
    model.set_attn_implementation(NAME)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", NAME) != NAME:
            raise RuntimeError(f"{type(module).__name__} kept attention "
                               f"{config._attn_implementation!r}, not {NAME!r}")
    return model
