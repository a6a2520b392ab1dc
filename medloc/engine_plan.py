"""Which ZeRO stage: the per-GPU memory of the model states under each stage, and the rule behind
``engine.zero_stage=auto`` (the cheapest stage, and offload, whose states fit the GPUs).

On one GPU, partitioning a model that fits is pure overhead (ZeRO-3 all-gathers every layer in every
forward and backward); on several it is what makes a large model fit at all. The rule walks the
candidates from the cheapest to the most frugal in memory and takes the first that fits.

Memory accounting, bytes per GPU (N = all parameters, T = trainable parameters, W = data-parallel
processes, i.e. the world size). Mixed precision with Adam (ZeRO paper, Rajbhandari et al. 2020,
§3.1: 2 + 2 + K bytes per parameter with K = 12), as DeepSpeed runs it with ``bf16.enabled``:

    bf16 weights                     2 N   the model the forward runs
    bf16 gradients                   2 T   accumulated over micro-batches in ``param.grad``
    fp32 master weights              4 T   the copy Adam updates (bf16 cannot hold small updates)
    fp32 Adam moments m, v           8 T
    fp32 gradient copy for the step  4 T   DeepSpeed casts the gradients to fp32 before Adam
                                           (ZeRO-0: one flat copy per group; ZeRO-1/2/3: of the
                                           rank's partition). DeepSpeed's own estimators count it
                                           (``estimate_zero2_model_states_mem_needs``: 16 bytes of
                                           optimizer-side state per parameter, not 12).
    frozen bf16 reference            2 N   GRPO with beta > 0 only; no gradients, no optimizer

so the optimizer side is 4 + 8 + 4 = 16 bytes per trainable parameter, and ZeRO-0 with a reference
costs 2N + 2T + 16T + 2N (22 bytes per parameter when all are trained). fp32 training (the tiny
model on CPU) has no master copy and no cast: 4 N weights, 4 T gradients, 8 T Adam moments.

What each stage partitions over the W processes (divides by W):

    stage 0   nothing (every process holds everything)
    stage 1   the optimizer side (16 T / W)                  -- never chosen: stage 2 saves more
    stage 2   the optimizer side and the gradients             for about the same communication
    stage 3   the optimizer side, the gradients, the weights and (here) the reference
    + offload_optimizer (ZeRO-Offload, stage >= 1): master weights, moments and the fp32 gradients
              live in CPU memory and the reduced bf16 gradients are copied there, so the GPU keeps
              neither gradients nor optimizer state (DeepSpeed's estimator: 2 N on the GPU)
    + offload_params (stage 3 only): the weights and the reference live in CPU memory too; the GPU
              holds the layers being gathered (counted in the headroom)

One more phase matters under stage 3 in THIS engine: ``Engine.generation_context`` gathers every
parameter of the policy for sampling (hooks off, ~5x faster generation), so while generating each
GPU holds the full bf16 policy (2 N) beside its own partitions. Stage 3 therefore saves memory only
through the optimizer side and the reference, never below 2 N per GPU.

Candidates from the cheapest to the most frugal (the order of the Hugging Face DeepSpeed guide,
"how to choose which ZeRO stage and offloads to use": stage 0 > 1 > 2 > 2 + offload > 3 >
3 + offloads in speed): 0, 2, 2 + offload_optimizer, 3, 3 + offload_optimizer,
3 + offload_optimizer + offload_params. A candidate fits when its model states plus the headroom
(activations with gradient checkpointing, logits, KV cache, DeepSpeed buckets, the allocator's
fragmentation, the CUDA context: ``engine.auto_headroom_gib``, ASSUMED) are at most the GPU's
memory. On one process, stage 2 and 3 without offload save nothing over stage 0 and are never
chosen. CPU memory (the offloaded state) is not checked.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class ZeroPlan:
    """A ZeRO stage with its offload switches (what ``EngineSpec`` takes)."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        extra = [name for name, on in (("offload_optimizer", self.offload_optimizer),
                                       ("offload_params", self.offload_params)) if on]
        return "+".join([f"ZeRO-{self.stage}", *extra])


# The cheapest first (see the module docstring).
CANDIDATES = (
    ZeroPlan(0),
    ZeroPlan(2),
    ZeroPlan(2, offload_optimizer=True),
    ZeroPlan(3),
    ZeroPlan(3, offload_optimizer=True),
    ZeroPlan(3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class BytesPerParam:
    """Bytes per parameter: model weights (all N), gradients and optimizer side (trainable T)."""

    weights: int
    grads: int
    optimizer: int


def bytes_per_param(precision: str) -> BytesPerParam:
    """bf16: 2 weights, 2 gradients, 16 optimizer side (fp32 master 4 + Adam m, v 8 + fp32 gradient
    copy 4). fp32: 4 weights, 4 gradients, 8 optimizer side (Adam m, v; no master, no cast)."""
    if precision == "bf16":
        return BytesPerParam(weights=2, grads=2, optimizer=4 + 8 + 4)
    if precision == "fp32":
        return BytesPerParam(weights=4, grads=4, optimizer=8)
    raise ValueError(f"precision={precision!r}: expected 'bf16' or 'fp32'")


@dataclass(frozen=True)
class MemoryEstimate:
    """Model-state bytes per GPU under one plan. ``generation_extra``: the full policy gathered for
    sampling under stage 3 (beside the partitions), 0 otherwise."""

    weights: int
    grads: int
    optimizer: int
    reference: int
    generation_extra: int

    @property
    def update(self) -> int:
        """During the update: weights, gradients, optimizer side and reference."""
        return self.weights + self.grads + self.optimizer + self.reference

    @property
    def generation(self) -> int:
        """While sampling: gradients are freed after the step; the rest stays, plus the gathered
        policy under stage 3."""
        return self.weights + self.optimizer + self.reference + self.generation_extra

    @property
    def peak(self) -> int:
        return max(self.update, self.generation)


def model_state_bytes(plan: ZeroPlan, *, n_params: int, n_trainable: int, bpp: BytesPerParam,
                      world_size: int, with_reference: bool) -> MemoryEstimate:
    """Bytes per GPU of the model states under ``plan`` (accounting in the module docstring)."""
    if not 0 <= n_trainable <= n_params:
        raise ValueError(f"need 0 <= n_trainable <= n_params, got {n_trainable}, {n_params}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    w = world_size
    s = plan.stage
    weights = n_params * bpp.weights  # stage 0-2: a full replica on every GPU
    reference = n_params * bpp.weights if with_reference else 0
    if s == 3:
        weights, reference = math.ceil(weights / w), math.ceil(reference / w)
    if plan.offload_params:  # stage 3: in CPU memory (the layer being gathered is headroom)
        weights, reference = 0, 0
    grads = n_trainable * bpp.grads
    grads = math.ceil(grads / w) if s >= 2 else grads
    optimizer = n_trainable * bpp.optimizer
    optimizer = math.ceil(optimizer / w) if s >= 1 else optimizer
    if plan.offload_optimizer:  # ZeRO-Offload: gradients and optimizer side in CPU memory
        grads, optimizer = 0, 0
    gathered = n_params * bpp.weights if s == 3 else 0  # generation_context gathers the policy
    return MemoryEstimate(weights=weights, grads=grads, optimizer=optimizer, reference=reference,
                          generation_extra=gathered)


@dataclass(frozen=True)
class ZeroChoice:
    plan: ZeroPlan
    estimate: MemoryEstimate
    fits: bool  # False: not even the most frugal candidate fits (it is returned anyway)


def choose_zero_plan(*, n_params: int, n_trainable: int, bpp: BytesPerParam, world_size: int,
                     device_bytes: int | None, headroom_bytes: int,
                     with_reference: bool) -> ZeroChoice:
    """The cheapest candidate whose model states + headroom fit ``device_bytes`` per GPU.

    ``device_bytes=None`` (no GPU: the tiny model on CPU) compares against nothing and returns
    stage 0: host memory is one pool, partitioning it between processes saves nothing.
    """
    if device_bytes is None:
        plan = CANDIDATES[0]
        est = model_state_bytes(plan, n_params=n_params, n_trainable=n_trainable, bpp=bpp,
                                world_size=world_size, with_reference=with_reference)
        return ZeroChoice(plan, est, fits=True)
    choice = None
    for plan in CANDIDATES:
        est = model_state_bytes(plan, n_params=n_params, n_trainable=n_trainable, bpp=bpp,
                                world_size=world_size, with_reference=with_reference)
        choice = ZeroChoice(plan, est, fits=est.peak + headroom_bytes <= device_bytes)
        if choice.fits:
            return choice
    assert choice is not None
    return choice


# ---------------------------------------------------------------------------------------------
# inputs read at start: parameter counts from the checkpoint, the GPU's memory
# ---------------------------------------------------------------------------------------------


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header (8-byte length + JSON), without the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _is_vision(name: str) -> bool:
    return name.startswith(("visual.", "model.visual."))


def count_parameters(model_path: str | Path, *, freeze_vision: bool) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the checkpoint in ``model_path``, read from the
    safetensors headers (no weights loaded, nothing built). A tied lm_head counts once. Trainable =
    all, minus the vision tower when ``freeze_vision`` (what ``freeze_vision_tower`` freezes)."""
    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors: cannot count its parameters")
    shapes: dict[str, list[int]] = {}
    for f in files:
        shapes.update(_safetensors_shapes(f))
    config = json.loads((folder / "config.json").read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get(
        "tie_word_embeddings", False))
    if tied:
        shapes.pop("lm_head.weight", None)
    total = sum(math.prod(s) for s in shapes.values())
    vision = sum(math.prod(s) for k, s in shapes.items() if _is_vision(k))
    return total, total - vision if freeze_vision else total


def device_memory_bytes() -> tuple[int | None, str]:
    """(total memory of this process's GPU, its name), or (None, "cpu") without CUDA."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
    return int(props.total_memory), str(props.name)


# ---------------------------------------------------------------------------------------------
# the decision of a run
# ---------------------------------------------------------------------------------------------


def _size(b: int) -> str:
    return f"{b / GIB:.1f} GiB" if b >= GIB // 10 or b == 0 else f"{b / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.2f}M"


@dataclass(frozen=True)
class ZeroDecision:
    """What the run uses and why: logged at start and recorded in run_info.json."""

    plan: ZeroPlan
    chosen_by: str  # "auto" or "config"
    fits: bool
    estimate: MemoryEstimate
    n_params: int
    n_trainable: int
    precision: str
    world_size: int
    device: str
    device_bytes: int | None
    headroom_bytes: int

    def line(self) -> str:
        """One line: the stage, the estimated bytes per GPU and what they were compared against."""
        e = self.estimate
        how = ("engine.zero_stage=auto" if self.chosen_by == "auto"
               else f"engine.zero_stage={self.plan.stage}")
        gathered = (f", gathered for generation {_size(e.generation_extra)}"
                    if e.generation_extra else "")
        weights = ("weights and reference in CPU memory" if self.plan.offload_params else
                   f"weights {_size(e.weights)}, reference {_size(e.reference)}")
        optimizer = ("grads and optimizer in CPU memory" if self.plan.offload_optimizer else
                     f"grads {_size(e.grads)}, optimizer {_size(e.optimizer)}")
        parts = [
            (f"[engine] {self.plan.label} ({how}) on {self.world_size} process(es): "
             f"{_count(self.n_params)} params ({_count(self.n_trainable)} trainable, "
             f"{self.precision})"),
            (f"estimated per GPU: {weights}, {optimizer}{gathered}; "
             f"peak {_size(e.peak)} + headroom {_size(self.headroom_bytes)}"),
        ]
        if self.device_bytes is None:
            parts.append("no GPU: memory not compared")
        else:
            verdict = "fits" if self.fits else (
                "DOES NOT FIT: the most frugal stage is used anyway" if self.chosen_by == "auto"
                else "DOES NOT FIT by this estimate (engine.zero_stage=auto picks one that does)")
            parts.append(f"vs {_size(self.device_bytes)} of {self.device}: {verdict}")
        return " | ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.plan), "label": self.plan.label, "chosen_by": self.chosen_by,
            "fits": self.fits, "n_params": self.n_params, "n_trainable": self.n_trainable,
            "precision": self.precision, "world_size": self.world_size, "device": self.device,
            "device_bytes": self.device_bytes, "headroom_bytes": self.headroom_bytes,
            "estimate_bytes": {**asdict(self.estimate), "peak": self.estimate.peak},
        }


def decide(*, zero_stage: int | str, offload_optimizer: bool, offload_params: bool,
           headroom_gib: float, precision: str, model_path: str | Path, freeze_vision: bool,
           world_size: int, with_reference: bool,
           device: tuple[int | None, str] | None = None) -> ZeroDecision:
    """Resolve ``engine.zero_stage`` (a stage, or "auto") for this run. A named stage is used as
    configured (with its estimate, for the log); "auto" applies :func:`choose_zero_plan`.
    ``device``: (memory bytes, name) of the GPU; None reads this process's GPU."""
    n_params, n_trainable = count_parameters(model_path, freeze_vision=freeze_vision)
    device_bytes, device_name = device_memory_bytes() if device is None else device
    headroom = int(headroom_gib * GIB)
    bpp = bytes_per_param(precision)
    if zero_stage == "auto":
        choice = choose_zero_plan(n_params=n_params, n_trainable=n_trainable, bpp=bpp,
                                  world_size=world_size, device_bytes=device_bytes,
                                  headroom_bytes=headroom, with_reference=with_reference)
        plan, est, fits, by = choice.plan, choice.estimate, choice.fits, "auto"
    else:
        plan = ZeroPlan(int(zero_stage), offload_optimizer, offload_params)
        est = model_state_bytes(plan, n_params=n_params, n_trainable=n_trainable, bpp=bpp,
                                world_size=world_size, with_reference=with_reference)
        fits = device_bytes is None or est.peak + headroom <= device_bytes
        by = "config"
    return ZeroDecision(plan=plan, chosen_by=by, fits=fits, estimate=est, n_params=n_params,
                        n_trainable=n_trainable, precision=precision, world_size=world_size,
                        device=device_name, device_bytes=device_bytes, headroom_bytes=headroom)


def record(run_dir: Path, decision: ZeroDecision) -> None:
    """Add the decision to ``run_dir/run_info.json`` under "engine" (when the file exists: it is
    written by ``medloc.train``; a trainer built by hand has none)."""
    from medloc.atomic import write_json_atomic

    path = Path(run_dir) / "run_info.json"
    if not path.is_file():
        return
    info = json.loads(path.read_text())
    info["engine"] = decision.as_dict()
    write_json_atomic(path, info)
