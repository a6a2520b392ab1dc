"""Reward functions: per-sample IoUs in, per-sample rewards out (docs/method.md §3, §4).

Every function takes the threshold it needs as an explicit number; none knows about the
curriculum that chose it. Inputs are IoUs already computed in the original-image frame, with
parse failures entered as IoU 0.0 (docs/method.md §5). NaN IoUs are treated as 0.0 as well.

- :func:`binary_reward`    r = 1[IoU op τ]           MedLoc-R1 (§3), VLM-R1 fixed τ (§4)
- :func:`raw_iou_reward`   r = IoU                    Raw-IoU baseline (§4)
- :func:`gated_iou_reward` r = IoU · 1[IoU op ε]      V-Triune baseline (§4)
- :func:`hybrid_reward`    r = 1[IoU op τ] + λ·IoU    threshold + continuous signal (docs/beyond.md)
- :func:`band_reward`      r = 0 below τ − w, 1 at τ, linear between (docs/beyond.md)
- :func:`format_reward`    r = 1[format ok]           VLM-R1 format reward (§3, weight ASSUMED 1.0)
- :func:`combine_rewards`  Σ_k w_k r_k with explicit weights, plus per-component means to log.
- :func:`total_rewards`    the GRPO step's reward: w_acc · accuracy(kind, τ) + w_fmt · format.

``op`` is the comparison operator: ``">="`` as the paper writes it, ``">"`` as early VLM-R1
coded it (docs/method.md §4). It is always explicit at the call site that matters (the scheduler's
``.op``); the keyword default here is the paper's. Which accuracy reward a run uses is
``reward.kind`` (:data:`RewardKind`), never the schedule's choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, get_args

import numpy as np

from medloc.parsing import ParsedAnswer

CompareOp = Literal[">=", ">"]
RewardKind = Literal["binary", "raw_iou", "gated_iou", "hybrid", "band"]

__all__ = [
    "CompareOp",
    "RewardKind",
    "accuracy_reward",
    "band_reward",
    "binary_reward",
    "combine_rewards",
    "compare",
    "format_reward",
    "gated_iou_reward",
    "hybrid_reward",
    "raw_iou_reward",
    "total_rewards",
]


def _ious(ious: Iterable[float] | np.ndarray) -> np.ndarray:
    """IoUs as float64 ``[N]`` with NaN -> 0.0 (a miss)."""
    arr = np.asarray(ious, dtype=np.float64).reshape(-1)  # [N]
    return np.nan_to_num(arr, nan=0.0)


def compare(values: Iterable[float] | np.ndarray, threshold: float, op: str) -> np.ndarray:
    """``values op threshold`` elementwise as a bool array; ``op`` in (">=", ">")."""
    arr = np.asarray(values, dtype=np.float64)
    if op == ">=":
        return arr >= threshold
    elif op == ">":
        return arr > threshold
    raise ValueError(f"unknown comparison op {op!r}; allowed: {get_args(CompareOp)}")


def binary_reward(ious: Iterable[float] | np.ndarray, tau: float, op: str = ">=") -> np.ndarray:
    """r_i = 1[IoU_i op τ] as float64 ``[N]`` (docs/method.md §3)."""
    return compare(_ious(ious), float(tau), op).astype(np.float64)


def raw_iou_reward(ious: Iterable[float] | np.ndarray) -> np.ndarray:
    """r_i = IoU_i, clipped to [0, 1] (Raw-IoU baseline, docs/method.md §4)."""
    return np.clip(_ious(ious), 0.0, 1.0)


def gated_iou_reward(ious: Iterable[float] | np.ndarray, eps: float, op: str = ">=") -> np.ndarray:
    """r_i = IoU_i · 1[IoU_i op ε] (V-Triune, docs/method.md §4)."""
    x = raw_iou_reward(ious)  # [N]
    return np.where(compare(x, float(eps), op), x, 0.0)


def hybrid_reward(ious: Iterable[float] | np.ndarray, tau: float, lam: float,
                  op: str = ">=") -> np.ndarray:
    """r_i = 1[IoU_i op τ] + λ·IoU_i (docs/beyond.md): the curriculum's threshold term plus a
    continuous IoU term that still orders the samples of a group none of which reaches τ."""
    x = raw_iou_reward(ious)  # [N]
    return compare(x, float(tau), op).astype(np.float64) + float(lam) * x


def band_reward(ious: Iterable[float] | np.ndarray, tau: float, width: float,
                op: str = ">=") -> np.ndarray:
    """r_i = 1 when IoU_i op τ; 0 at or below the lower edge L = max(τ − w, 0); (IoU − L)/(τ − L)
    between (docs/beyond.md; Vision-R1's band with its upper edge at the curriculum's τ).

    L is held at 0 so that IoU 0 (a parse failure or no overlap) always gets 0, as under
    ``binary``. Between the edges IoU − L > 0 and τ − L >= IoU − L, so the ratio is in (0, 1].
    """
    x = raw_iou_reward(ious)  # [N]
    tau, width = float(tau), float(width)
    lower = max(tau - width, 0.0)
    hit = compare(x, tau, op)  # [N]
    span = tau - lower
    ramp = np.where(x > lower, (x - lower) / span if span > 0 else 1.0, 0.0)  # [N]
    return np.where(hit, 1.0, np.clip(ramp, 0.0, 1.0))


def format_reward(parsed_list: Iterable[ParsedAnswer]) -> np.ndarray:
    """r_i = 1 when completion i has the required format (``ParsedAnswer.format_ok``), else 0.

    What "the required format" is depends on the parsing rule and answer format the completions were
    parsed with (``reward.parse_rule``, ``reward.answer_format``); ``medloc.parsing`` writes it down.
    """
    return np.asarray([1.0 if p.format_ok else 0.0 for p in parsed_list], dtype=np.float64)


def accuracy_reward(ious: Iterable[float] | np.ndarray, kind: str, threshold: float | None,
                    op: str = ">=", *, hybrid_lambda: float | None = None,
                    band_width: float | None = None) -> np.ndarray:
    """The accuracy reward of kind ``reward.kind`` under a schedule's threshold:
    ``accuracy_reward(ious, cfg.reward.kind, sched.tau, sched.op, hybrid_lambda=...,
    band_width=...)``.

    kind "binary" needs ``threshold`` = τ; "gated_iou" needs ``threshold`` = ε; "hybrid" needs τ
    and ``hybrid_lambda`` = λ; "band" needs τ and ``band_width`` = w; "raw_iou" takes
    ``threshold=None`` (a number there is a configuration mistake and raises). λ and w are read
    only by their own kind (the reward config always carries both).
    """
    if kind == "binary":
        if threshold is None:
            raise ValueError("accuracy_reward kind 'binary' needs a threshold τ, got None")
        return binary_reward(ious, threshold, op)
    elif kind == "gated_iou":
        if threshold is None:
            raise ValueError("accuracy_reward kind 'gated_iou' needs a threshold ε, got None")
        return gated_iou_reward(ious, threshold, op)
    elif kind == "hybrid":
        if threshold is None or hybrid_lambda is None:
            raise ValueError(f"accuracy_reward kind 'hybrid' needs a threshold τ and hybrid_lambda, "
                             f"got threshold={threshold!r}, hybrid_lambda={hybrid_lambda!r}")
        return hybrid_reward(ious, threshold, hybrid_lambda, op)
    elif kind == "band":
        if threshold is None or band_width is None:
            raise ValueError(f"accuracy_reward kind 'band' needs a threshold τ and band_width, "
                             f"got threshold={threshold!r}, band_width={band_width!r}")
        return band_reward(ious, threshold, band_width, op)
    elif kind == "raw_iou":
        if threshold is not None:
            raise ValueError(f"accuracy_reward kind 'raw_iou' takes no threshold, got {threshold!r}")
        return raw_iou_reward(ious)
    raise ValueError(f"unknown reward kind {kind!r}; allowed: {get_args(RewardKind)}")


def combine_rewards(components: Mapping[str, np.ndarray],
                    weights: Mapping[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    """Weighted sum of named per-sample reward components.

    ``total[i] = Σ_k weights[k] · components[k][i]``. The two mappings must name the same
    components (a weight without a component, or the reverse, is a configuration mistake), and
    every component must have the same length N.

    Returns ``(total [N], metrics)`` with ``reward/<name>`` = mean of each unweighted component,
    ``reward/mean`` and ``reward/std`` (population) of the total.
    """
    if set(components) != set(weights):
        raise ValueError(
            f"reward components {sorted(components)} and weights {sorted(weights)} must name the "
            f"same keys (missing weights: {sorted(set(components) - set(weights))}, "
            f"weights without component: {sorted(set(weights) - set(components))})"
        )
    if not components:
        raise ValueError("combine_rewards needs at least one component")
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in components.items()}
    lengths = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"reward components must have equal lengths, got {lengths}")
    n = next(iter(lengths.values()))
    total = np.zeros(n, dtype=np.float64)  # [N]
    metrics: dict[str, float] = {}
    for name in sorted(arrays):
        total += float(weights[name]) * arrays[name]
        metrics[f"reward/{name}"] = float(arrays[name].mean()) if n else float("nan")
    metrics["reward/mean"] = float(total.mean()) if n else float("nan")
    metrics["reward/std"] = float(total.std()) if n else float("nan")
    return total, metrics


def total_rewards(
    ious: Iterable[float] | np.ndarray,
    parsed: Sequence[ParsedAnswer],
    *,
    kind: str,
    threshold: float | None,
    op: str,
    accuracy_weight: float,
    format_weight: float,
    hybrid_lambda: float | None = None,
    band_width: float | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Total reward per sample = w_acc * accuracy(IoU; kind, threshold, op) + w_fmt * format.

    The GRPO step's reward: the accuracy kind (binary at τ, raw IoU, gated IoU, hybrid, band), its
    λ / w and the weights are the reward config's (``reward.kind``, ``reward.hybrid_lambda``,
    ``reward.band_width``, ``reward.*_weight``), the threshold the schedule's. Returns
    ``combine_rewards``' (total, metrics).
    """
    components = {
        "accuracy": accuracy_reward(ious, kind, threshold, op, hybrid_lambda=hybrid_lambda,
                                    band_width=band_width),
        "format": format_reward(parsed),
    }
    return combine_rewards(components, {"accuracy": accuracy_weight, "format": format_weight})
