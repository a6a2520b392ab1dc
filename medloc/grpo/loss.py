"""The GRPO objective: token log-probs, clipped surrogate, k3 KL, aggregation (docs/method.md §2).

Per completion token t of completion i, with ratio rho = pi_theta / pi_old (docs/method.md §2):

    objective_{i,t} = min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) - beta * KL_k3
    KL_k3           = exp(ref_logp - logp) - (ref_logp - logp) - 1

The loss is the negated objective, aggregated over tokens in one of three ways (``Aggregation``).

Micro-batching and several processes. A global batch of sequences is usually split into
micro-batches (gradient accumulation) and spread over ranks. ``grpo_loss`` is written so that the
caller passes the *global* normaliser (the number of sequences, or of completion tokens, in the
whole global batch across all micro-batches and all ranks). Each call then returns that
micro-batch's exact share of the global loss, and the sum of the returned losses over all
micro-batches and ranks (and the sum of their gradients) equals the loss of the full batch computed
in one call, whatever the micro-batch size or the number of processes. Note for the trainer: data-
parallel engines (DDP, DeepSpeed) *average* gradients over ranks, so with W ranks each rank's loss
must be multiplied by W to obtain the sum.

Shapes: N sequences in this micro-batch (some of the B*G completions), L completion tokens (padded),
V vocabulary size.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

# The SFT loss's float32 cross-entropy (medloc/sft.py) takes the supervised positions' logits in
# chunks of at most this many elements (at least one position per chunk): the float32 copy of one chunk and its log-softmax are
# the largest temporaries, 256 MiB each, i.e. 441 positions of Qwen2.5-VL's 151,936-token
# vocabulary, and the tiny model's whole micro-batch in one chunk. Each position's loss is the same
# whatever the chunk size; only the order of the final sum changes.
CE_CHUNK_ELEMENTS = 64 * 2**20

Aggregation = Literal["grpo", "bnpo", "dr_grpo"]
"""How per-token losses become one scalar (docs/method.md §2):

- ``"grpo"``: mean over each sequence's own tokens, then mean over sequences (VLM-R1 / TRL
  default; normaliser: the global number of sequences).
- ``"bnpo"``: sum over all tokens / global number of completion tokens (token-level mean over the
  whole global batch; what TRL calls "dapo" when the count is global, as it always is here).
- ``"dr_grpo"``: sum over all tokens / (global number of sequences * max_completion_len), the
  constant normaliser of Dr. GRPO.
"""


def selective_log_softmax(logits: Tensor, ids: Tensor) -> Tensor:
    """Log-probability of the chosen token at every position: ``log_softmax(logits)[..., ids]``.

    Computed one sequence at a time as ``logit[id] - logsumexp(logits)`` in float32 (or float64 if
    the logits are float64), so only one ``[L, V]`` float32 copy of the logits exists at a time
    instead of a full ``[N, L, V]`` log-softmax. Differentiable.

    Args:
        logits: ``[N, L, V]`` (any float dtype, e.g. bf16).
        ids: ``[N, L]`` token ids (int64) into the last dimension of ``logits``.

    Returns:
        ``[N, L]`` log-probabilities in float32 (float64 for float64 logits).
    """
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [N, L, V] and ids [N, L]; got {tuple(logits.shape)} and "
            f"{tuple(ids.shape)}"
        )
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits, row_ids in zip(logits, ids):  # [L, V], [L]
        row = row_logits.to(compute_dtype)  # [L, V]
        picked = row.gather(dim=-1, index=row_ids.unsqueeze(-1)).squeeze(-1)  # [L]
        rows.append(picked - torch.logsumexp(row, dim=-1))  # [L]
    if not rows:
        return logits.new_zeros(ids.shape, dtype=compute_dtype)
    return torch.stack(rows)  # [N, L]


def sampled_token_logprobs(logits: Tensor, ids: Tensor, *, temperature: float,
                           banned: Tensor | None = None) -> Tensor:
    """Log-probability of ``ids`` under the distribution they were sampled from.

    That distribution is ``softmax(logits / temperature)`` with the ``banned`` tokens (a [V]
    boolean mask, e.g. the vision tokens) at probability 0 -- what ``medloc.generation`` draws
    from. Rows are processed in chunks of at most ``LOGPROB_CHUNK_ELEMENTS`` logits (at least one
    row): the float32 copy of one chunk is the largest temporary, so a large vocabulary still
    works about one ``[L, V]`` row at a time while a small one needs only a few tensor ops.

    Args:
        logits: ``[N, L, V]`` raw logits (any float dtype).
        ids: ``[N, L]`` token ids.
        temperature: > 0.
        banned: ``[V]`` bool or None.

    Returns:
        ``[N, L]`` float32 log-probabilities (differentiable).
    """
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [N, L, V] and ids [N, L]; got {tuple(logits.shape)} and "
            f"{tuple(ids.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.shape[0] == 0:
        return logits.new_zeros(ids.shape, dtype=compute_dtype)
    parts = []
    step = _rows_per_chunk(logits.shape[1] * logits.shape[2])
    for start in range(0, logits.shape[0], step):
        chunk = logits[start : start + step].to(compute_dtype) / temperature  # [n, L, V]
        if banned is not None:
            chunk = chunk.masked_fill(banned, float("-inf"))  # [n, L, V]
        chunk_ids = ids[start : start + step].unsqueeze(-1)  # [n, L, 1]
        picked = chunk.gather(dim=-1, index=chunk_ids).squeeze(-1)  # [n, L]
        parts.append(picked - torch.logsumexp(chunk, dim=-1))  # [n, L]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # [N, L]


# The largest float32 temporary of ``sampled_token_logprobs``, in elements (64 Mi = 256 MiB): rows
# are taken in chunks of at most this many logits (at least one row per chunk), so a small model
# does the whole micro-batch in a few tensor ops while a 152k-token vocabulary still works on
# about one [L, V] row at a time. Each row's result is the same whatever the chunk size.
LOGPROB_CHUNK_ELEMENTS = 64 * 2**20


def _rows_per_chunk(elements_per_row: int) -> int:
    return max(1, LOGPROB_CHUNK_ELEMENTS // max(1, elements_per_row))


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref) (docs/method.md §2).

    ``exp(ref_logp - logp) - (ref_logp - logp) - 1``, written as ``expm1(d) - d`` with
    ``d = ref_logp - logp``: the same number mathematically, but it stays >= 0 in floating point
    for tiny ``d`` (``exp(d) - d - 1`` can round to a small negative value). It is exactly 0 where
    ``logp == ref_logp`` and positive elsewhere.

    Args:
        logp: ``[N, L]`` policy log-probs of the sampled tokens.
        ref_logp: ``[N, L]`` reference-model log-probs of the same tokens.

    Returns:
        ``[N, L]`` per-token KL estimates.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape"
        )
    d = ref_logp - logp  # [N, L]
    return torch.expm1(d) - d  # [N, L]


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    aggregation: Aggregation = "grpo",
    global_tokens: float | None = None,
    global_sequences: float | None = None,
    max_completion_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss with k3 KL penalty (docs/method.md §2).

    Args:
        logp: ``[N, L]`` log-probs of the completion tokens under the policy being trained
            (carries the gradient).
        old_logp: ``[N, L]`` log-probs under the policy that sampled the completions; ``None``
            means on-policy (mu = 1 update per rollout): ``logp.detach()`` is used, so the ratio is
            1 in value but still carries the gradient of ``logp``.
        ref_logp: ``[N, L]`` log-probs under the frozen reference model; may be ``None`` only when
            ``beta == 0``. With ``beta == 0`` and a reference given, the KL is still reported in the
            metrics but contributes nothing to the loss.
        advantages: ``[N]`` one advantage per sequence (from ``group_advantages``).
        mask: ``[N, L]`` 1/True for real completion tokens, 0/False for padding (and anything
            after EOS).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` for the ratio (paper: 0.2
            and 0.2).
        beta: KL weight (paper: 0.4; VLM-R1/older TRL: 0.04).
        aggregation: see ``Aggregation``.
        global_tokens: number of completion tokens (mask sum) in the whole global batch, over all
            micro-batches and ranks; used by ``"bnpo"``. ``None``: this call is the whole batch
            (the local mask sum is used).
        global_sequences: number of sequences in the whole global batch; used by ``"grpo"`` and
            ``"dr_grpo"``. ``None``: this call is the whole batch (N is used).
        max_completion_len: the constant length normaliser of ``"dr_grpo"`` (the generation
            limit, max_new_tokens); required for it and must be >= L.

    Returns:
        ``(loss, metrics)``: ``loss`` is this micro-batch's share of the global loss (a 0-d
        tensor with grad). Metrics are masked token means over this micro-batch, detached 0-d
        tensors (0 if the micro-batch has no unmasked token; ``float()`` them when logging):

        - ``loss/policy``: mean of ``-min(rho*A, clip(rho)*A)``;
        - ``loss/kl``: mean k3 KL (0.0 when no reference is given);
        - ``loss/total``: ``loss/policy + beta * loss/kl``;
        - ``loss/clip_frac``: fraction of tokens where the clipped branch is active, i.e. the
          gradient is cut: ``rho < 1 - eps_low`` with ``A < 0`` or ``rho > 1 + eps_high`` with
          ``A > 0``;
        - ``policy/ratio_mean``: mean of ``rho``.
    """
    if aggregation not in get_args(Aggregation):
        raise ValueError(f"aggregation={aggregation!r}; expected one of {get_args(Aggregation)}")
    if logp.ndim != 2:
        raise ValueError(f"logp must be [N, L]; got shape {tuple(logp.shape)}")
    n_seq, seq_len = logp.shape
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(logp.shape)}")
    if advantages.shape != (n_seq,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected ({n_seq},)")
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"eps_low={eps_low}, eps_high={eps_high}; expected 0 <= eps_low < 1, "
                         "eps_high >= 0")
    if beta < 0:
        raise ValueError(f"beta={beta}; expected >= 0")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference model's log-probs)")

    dtype = torch.promote_types(logp.dtype, torch.float32)
    keep = mask.bool()  # [N, L]
    m = keep.to(dtype)  # [N, L]
    # Zero the log-probs at padded positions before any arithmetic, so that whatever the caller
    # left there (even inf/NaN) cannot leak into the loss or, through 0 * inf, into the gradient.
    logp = torch.where(keep, logp.to(dtype), 0.0)  # [N, L]
    if old_logp is None:
        old = logp.detach()  # [N, L]
    else:
        old = torch.where(keep, old_logp.detach().to(dtype), 0.0)  # [N, L]
    if ref_logp is not None:
        ref_logp = torch.where(keep, ref_logp.detach().to(dtype), 0.0)  # [N, L]
    adv = advantages.detach().to(dtype)[:, None]  # [N, 1]

    # Clipped surrogate (docs/method.md §2). Loss = -objective.
    ratio = torch.exp(logp - old)  # [N, L]
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [N, L]
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)  # [N, L]
    per_token_policy = -surrogate  # [N, L]

    if ref_logp is not None:
        per_token_kl = kl_k3(logp, ref_logp)  # [N, L]
    else:
        per_token_kl = torch.zeros_like(logp)  # [N, L]
    per_token = per_token_policy + beta * per_token_kl if beta > 0 else per_token_policy  # [N, L]

    # Aggregation with the caller's global normaliser.
    if aggregation == "grpo":
        n_global = float(n_seq) if global_sequences is None else float(global_sequences)
        _check_positive("global_sequences", n_global)
        seq_tokens = m.sum(dim=1).clamp(min=1.0)  # [N]; a sequence with no token contributes 0
        seq_mean = (per_token * m).sum(dim=1) / seq_tokens  # [N]
        loss = seq_mean.sum() / n_global
    elif aggregation == "bnpo":
        n_global = m.sum().item() if global_tokens is None else float(global_tokens)
        _check_positive("global_tokens", n_global)
        loss = (per_token * m).sum() / n_global
    elif aggregation == "dr_grpo":
        if max_completion_len is None or max_completion_len < seq_len:
            raise ValueError(
                f"aggregation='dr_grpo' needs max_completion_len >= L={seq_len}; "
                f"got {max_completion_len}"
            )
        n_global = float(n_seq) if global_sequences is None else float(global_sequences)
        _check_positive("global_sequences", n_global)
        loss = (per_token * m).sum() / (n_global * max_completion_len)
    else:  # unreachable: validated above
        raise AssertionError(aggregation)

    # Metrics stay 0-d tensors on the loss's device: reading them (a host synchronisation) is
    # the caller's choice, once per optimizer step rather than once per micro-batch.
    with torch.no_grad():
        n_tok = m.sum().clamp(min=1.0)

        def masked_mean(x: Tensor) -> Tensor:
            return (x * m).sum() / n_tok  # 0-d

        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        policy_mean = masked_mean(per_token_policy)
        kl_mean = masked_mean(per_token_kl)
        metrics = {
            "loss/policy": policy_mean,
            "loss/kl": kl_mean,
            "loss/total": policy_mean + beta * kl_mean,
            "loss/clip_frac": masked_mean(is_clipped.to(dtype)),
            "policy/ratio_mean": masked_mean(ratio),
        }
    return loss, metrics


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value}; the global normaliser must be > 0")
