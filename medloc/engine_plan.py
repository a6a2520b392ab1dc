"""Memory plans from the run's own numbers: the per-GPU peak and the host RAM of each ZeRO stage,
and the rule behind ``engine.zero_stage=auto`` (the cheapest stage, and offload, that fits).

    python -m medloc.engine_plan --model 7b --gpus 4 --gpu-gib 80 --host-gib 512

prints the plan of any model (a named shape or a checkpoint folder), world size, GPU and host
(``--markdown`` for a table; ``--what-fits`` for the table of docs/memory_plans.md).

On one GPU, partitioning a model that fits is pure overhead (ZeRO-3 all-gathers every layer in every
forward and backward); on several it is what makes a large model fit at all. The rule walks the
candidates from the cheapest to the most frugal in memory and takes the first that fits: its
per-GPU peak plus ``engine.auto_reserve_gib`` at most the GPU's memory, and its host bytes plus
``engine.auto_host_reserve_gib`` at most the host's RAM. A named stage is used as configured; its
plan is printed all the same. Without a GPU (the tiny model on CPU) nothing is compared and the
plan is ZeRO-0: host memory is one pool, partitioning it between processes saves nothing.

Notation: N all parameters, T trainable (N minus the vision tower when ``model.freeze_vision``),
W data-parallel processes (the world size), R processes per node, w bytes per weight (2 bf16,
4 fp32); B prompts per process, G samples per prompt, N_rows = B G rows per process, mb the
micro-batch; I image tokens per image, P = I + prompt text tokens, L = ``grpo.max_new_tokens``,
K = P + L cache slots; h, f, V the language model's hidden size, intermediate size, vocabulary.

1. Model states per GPU. Mixed precision with Adam (ZeRO paper, Rajbhandari et al. 2020, §3.1),
   as DeepSpeed runs it with ``bf16.enabled``:

       bf16 weights                     2 N   the model the forward runs
       bf16 gradients                   2 T   accumulated over micro-batches
       fp32 master weights              4 T   the copy Adam updates
       fp32 Adam moments m, v           8 T
       fp32 gradient copy for the step  4 T   DeepSpeed casts the gradients to fp32 before Adam
       frozen bf16 reference            2 N   GRPO with beta > 0 only

   so the optimizer side is 16 bytes per trainable parameter (fp32 training: 4 N weights, 4 T
   gradients, 8 T moments). LoRA (``peft=lora``): the base is frozen and the A adapter parameters
   train (``lora_parameter_count``: r (in + out) per adapted linear layer), so the weights are
   w (N + A), T = A, and there is no reference copy (the reference is the policy with its adapters
   off); the vision tower then runs without gradient unless ``peft.include_vision``. What each stage partitions over W (divides by W): stage 1 the
   optimizer side, stage 2 also the gradients, stage 3 also the weights and the reference.
   ``offload_optimizer`` (stage >= 1) keeps the optimizer side and the gradients in CPU memory;
   ``offload_params`` (stage 3) keeps the weights and the reference there. Under stage 3 the
   update holds the layer being gathered and its gradient: 4 bytes x the largest module's
   parameters in bf16, DeepSpeed's own ``largest_layer_memory``. These terms are held to DeepSpeed's
   estimators (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``)
   in tests/unit/test_engine_plan.py for the 3B, 7B and 32B shapes on 1, 4 and 8 GPUs.

2. The generation gather. ``Engine.generation_context`` gathers every parameter of the policy at
   once (``deepspeed.zero.GatheredParameters`` over all parameters) and samples with the hooks off,
   so under stage 3 each GPU holds the full policy (w N) beside its own partition while generating;
   with ``offload_params`` the partitions are staged from CPU memory onto the GPU for that gather as
   well (w N + w N / W). Stage 3 therefore never brings a GPU below w N.

3. Activations, KV cache and logits from the config (functions below, each with its bytes):
   image tokens from ``dataset.max_pixels`` (one token per (patch x merge)^2 = 28 x 28 pixels), the
   prompt's text tokens (``engine.auto_prompt_text_tokens``, ASSUMED), ``grpo.max_new_tokens``,
   micro-batch, G, prompts per step, the model's layers, hidden and intermediate sizes, vocabulary,
   key/value heads and head size, gradient checkpointing, precision, attention implementation.

4. Phases. Each phase's peak is the sum of the terms alive in it; the plan's peak is the largest.
   B_mb = the most prompts a micro-batch holds (``micro_batch_prompts``; one more when it splits a
   group); with ``grpo.shared_prefix_update`` (default) a forward of the update
   (``models.logprobs.shared_prefix_logprobs``) is two passes: a prefix pass over the B_mb prompts
   (B_mb x P tokens, keeping every layer's keys/values, with grad in the policy forward) and a
   completion pass of mb x (L - 1) tokens over those keys/values repeated per row (a copy,
   layers x mb x P x 2 x kv_heads x head_dim x w, kept for the backward; each layer's attention
   also keeps them as it sees them):

       generate: vision tower   states + gather + the tower on B images (no grad)
       generate: prefill        states + gather + image features + the B prompts' forward + their
                                KV cache (B rows x K slots)
       generate: decode         states + gather + image features + KV cache (N_rows x K) + sampling
       reference forward        states + the reference's tower (trainable tower: once per image) +
                                shared prefix: the larger pass (no grad), the prefix keys/values
                                and their per-row copy, the logits at L positions beside the
                                completion pass's L - 1; switch false: its forward on mb rows x
                                (P + L) tokens + logits at L + 1 positions
       update                   states with gradients + the trainable tower once per image of
                                the micro-batch (B_mb images, ``logprobs.prompt_image_features``;
                                with grad, except under LoRA without vision adapters) + shared
                                prefix: both passes' activations kept to the backward
                                (checkpointed or not) and the larger backward, the prefix
                                keys/values with grad and their per-row copy; switch false: the
                                forward and backward on mb rows x (P + L) tokens + logits

   ("states" are the model states of 1; gradients exist only in the update.) With
   ``grpo.compile_decode`` the decode step's N_rows x K static cache (K rounded up to a multiple
   of ``generation.COMPILE_CACHE_MULTIPLE``) stays allocated between rollouts: every phase but
   decode holds it too. SFT has the update only: one forward of mb rows x (P + L) (no shared
   prefix) and logits only at the M <= mb x L supervised positions (``medloc.sft``: [M, V], the
   float32 cross-entropy in chunks of ``CE_CHUNK_ELEMENTS``).

5. Host RAM per node: R x the per-process CPU bytes. ``offload_optimizer``: fp32 master, Adam
   moments and fp32 gradients (16 T / W, pinned); ``offload_params``: the weights and the
   reference (w N / W each); loading: each process builds the model on the host before moving it
   to its GPU (w N; under stage 3 zero.Init partitions each module as it is built: w x the largest
   module). The load is counted on top of the offloaded state, as the reference loads after the
   policy's engine has allocated it.

ASSUMED values are config fields (``conf/engine/auto.yaml``, ``medloc.config.EngineConfig``):
``auto_reserve_gib`` (CUDA context, workspaces, DeepSpeed's communication buckets, allocator
fragmentation), ``auto_host_reserve_gib`` (the OS and each process's Python, torch and CUDA
runtime) and ``auto_prompt_text_tokens``. Everything else is arithmetic on the config and the
model's shape; what a GPU must still confirm is listed in docs/memory_plans.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

GIB = 2**30

Method = Literal["grpo", "sft"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]


# ---------------------------------------------------------------------------------------------
# candidates and bytes per parameter
# ---------------------------------------------------------------------------------------------


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


# The cheapest first (the Hugging Face DeepSpeed guide, "how to choose which ZeRO stage and offloads
# to use": stage 0 > 1 > 2 > 2 + offload > 3 > 3 + offloads in speed). Stage 1 is never a
# candidate: stage 2 saves more for about the same communication.
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


# ---------------------------------------------------------------------------------------------
# the model's shape: parameter counts and the sizes behind activations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the plan reads of a Qwen2.5-VL model (no weights)."""

    n_params: int  # all parameters (a tied lm_head once)
    n_vision_params: int  # the vision tower (patch embedding, blocks, merger)
    largest_module_params: int  # DeepSpeed's largest_layer_params: a module's own parameters
    hidden: int  # h
    intermediate: int  # f
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # V
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    vision_full_blocks: int  # blocks with full attention over the image (the rest: windows)
    vision_window_patches: int  # patches per attention window ((window_size / patch_size)^2)
    patch_size: int
    merge_size: int  # merge_size^2 patches make one image token
    patch_input: int  # values per patch: in_channels x temporal_patch_size x patch_size^2

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _text_and_vision(config: Any) -> tuple[Any, Any]:
    return config.get_text_config(decoder=True), config.vision_config


def qwen25vl_parameter_counts(config: Any) -> tuple[int, int, int]:
    """(all parameters, vision tower, largest module's own parameters) of a Qwen2.5-VL config,
    counted from its sizes (module by module, as transformers builds it; a tied lm_head once)."""
    text, vis = _text_and_vision(config)
    h, f, v = text.hidden_size, text.intermediate_size, text.vocab_size
    hd = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    text_modules = {
        "embed_tokens": v * h,
        "q_proj": h * q + q, "k_proj": h * kv + kv, "v_proj": h * kv + kv, "o_proj": q * h,
        "gate_proj": h * f, "up_proj": h * f, "down_proj": f * h,
    }
    per_layer = sum(n for k, n in text_modules.items() if k != "embed_tokens") + 2 * h  # 2 norms
    tied = bool(getattr(config, "tie_word_embeddings", False) or
                getattr(text, "tie_word_embeddings", False))
    lm_head = 0 if tied else v * h
    n_text = v * h + text.num_hidden_layers * per_layer + h + lm_head
    hv, fv = vis.hidden_size, vis.intermediate_size
    m2 = vis.spatial_merge_size ** 2
    vision_modules = {
        "patch_embed": vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2 * hv,
        "qkv": hv * 3 * hv + 3 * hv, "proj": hv * hv + hv,
        "gate_proj": hv * fv + fv, "up_proj": hv * fv + fv, "down_proj": fv * hv + hv,
        "merger.mlp.0": (m2 * hv) ** 2 + m2 * hv, "merger.mlp.2": m2 * hv * vis.out_hidden_size
        + vis.out_hidden_size,
    }
    block = sum(vision_modules[k] for k in ("qkv", "proj", "gate_proj", "up_proj", "down_proj"))
    n_vision = (vision_modules["patch_embed"] + vis.depth * (block + 2 * hv) + hv  # + ln_q
                + vision_modules["merger.mlp.0"] + vision_modules["merger.mlp.2"])
    largest = max([*text_modules.values(), lm_head, *vision_modules.values()])
    return n_text + n_vision, n_vision, largest


def shape_from_config(config: Any, *, n_params: int, n_vision_params: int,
                      largest_module_params: int) -> ModelShape:
    """A :class:`ModelShape` from a ``Qwen2_5_VLConfig`` and the parameter counts."""
    text, vis = _text_and_vision(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(
        n_params=n_params, n_vision_params=n_vision_params,
        largest_module_params=largest_module_params,
        hidden=text.hidden_size, intermediate=text.intermediate_size,
        layers=text.num_hidden_layers, heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads, head_dim=head_dim, vocab=text.vocab_size,
        vision_depth=vis.depth, vision_hidden=vis.hidden_size,
        vision_intermediate=vis.intermediate_size, vision_heads=vis.num_heads,
        vision_full_blocks=len(getattr(vis, "fullatt_block_indexes", []) or []),
        vision_window_patches=(vis.window_size // vis.patch_size) ** 2,
        patch_size=vis.patch_size, merge_size=vis.spatial_merge_size,
        patch_input=vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2,
    )


class _NoSpecialTokens:
    """``shapes.shape_config`` asks a tokenizer for the special tokens' ids; sizes need none."""

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0


NAMED_SHAPES = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b", "32b": "qwen2.5-vl-32b"}


def shape_from_table(name: str) -> ModelShape:
    """The shape of a released Qwen2.5-VL size ("3b", "7b", "32b" or a key of
    ``medloc.models.shapes.SHAPES``), parameters counted from its sizes (no weights)."""
    from medloc.models import shapes

    key = NAMED_SHAPES.get(name.lower(), name)
    if key not in shapes.SHAPES:
        raise ValueError(f"model {name!r}: expected one of {sorted(NAMED_SHAPES)}, a key of "
                         f"medloc.models.shapes.SHAPES ({sorted(shapes.SHAPES)}) or a checkpoint folder")
    config = shapes.shape_config(shapes.SHAPES[key], _NoSpecialTokens())
    n, vision, largest = qwen25vl_parameter_counts(config)
    return shape_from_config(config, n_params=n, n_vision_params=vision,
                             largest_module_params=largest)


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header (8-byte length + JSON), without the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _is_vision(name: str) -> bool:
    return name.startswith(("visual.", "model.visual."))


def _checkpoint_tensor_shapes(folder: Path) -> dict[str, list[int]]:
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
    return shapes


def count_parameters(model_path: str | Path, *, freeze_vision: bool) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the checkpoint in ``model_path``, read from the
    safetensors headers (no weights loaded, nothing built). A tied lm_head counts once. Trainable =
    all, minus the vision tower when ``freeze_vision`` (what ``freeze_vision_tower`` freezes)."""
    shapes = _checkpoint_tensor_shapes(Path(model_path))
    total = sum(math.prod(s) for s in shapes.values())
    vision = sum(math.prod(s) for k, s in shapes.items() if _is_vision(k))
    return total, total - vision if freeze_vision else total


def shape_from_checkpoint(model_path: str | Path) -> ModelShape:
    """The shape of the checkpoint in ``model_path``: sizes from its config.json, parameter counts
    (and the largest module, DeepSpeed's way: a module's own tensors) from the safetensors headers."""
    from transformers import AutoConfig

    folder = Path(model_path)
    shapes = _checkpoint_tensor_shapes(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    per_module: dict[str, int] = {}
    for name, s in shapes.items():
        module = name.rsplit(".", 1)[0]
        per_module[module] = per_module.get(module, 0) + math.prod(s)
    return shape_from_config(
        config, n_params=sum(math.prod(s) for s in shapes.values()),
        n_vision_params=sum(math.prod(s) for k, s in shapes.items() if _is_vision(k)),
        largest_module_params=max(per_module.values()))


# ---------------------------------------------------------------------------------------------
# the workload: what the config asks of one process
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The numbers of a run that size its activations, KV cache and logits (explicit; see
    :func:`workload_from_config` for where each comes from)."""

    method: str  # Method: "grpo" (generation, reference forward, update) or "sft" (update)
    max_pixels: int  # dataset.max_pixels: the processor's pixel budget per image
    prompt_text_tokens: int  # engine.auto_prompt_text_tokens (ASSUMED)
    completion_tokens: int  # L = grpo.max_new_tokens (SFT: an upper bound on the answer)
    micro_batch: int  # model.micro_batch_size
    num_generations: int  # G (1 for SFT)
    prompts_per_step: int  # over all processes (trainer.prompts_per_step; SFT: sft_batch_size)
    gradient_checkpointing: bool
    freeze_vision: bool
    attn_implementation: str  # Attention
    with_reference: bool  # GRPO with beta > 0
    old_policy_forward: bool = False  # GRPO with mu > 1: a no-grad forward like the reference's
    lora_rank: int = 0  # peft=lora: the adapters' rank r (0: full fine-tuning)
    lora_targets: tuple[str, ...] = ()  # peft.target_modules: the language model's layers adapted
    lora_vision: bool = False  # peft.include_vision: every linear layer of the tower adapted too
    shared_prefix_update: bool = True  # grpo.shared_prefix_update: prefix pass + completion pass
    compile_decode: bool = False  # grpo.compile_decode: one N x K static cache kept between rollouts

    def __post_init__(self) -> None:
        if self.method not in get_args(Method):
            raise ValueError(f"method={self.method!r}: expected one of {get_args(Method)}")
        if self.attn_implementation not in get_args(Attention):
            raise ValueError(f"attn_implementation={self.attn_implementation!r}: expected one of "
                             f"{get_args(Attention)}")
        for name in ("max_pixels", "completion_tokens", "micro_batch", "num_generations",
                     "prompts_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.prompt_text_tokens < 0:
            raise ValueError(f"prompt_text_tokens={self.prompt_text_tokens} must be >= 0")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 (0: no LoRA)")


def workload_from_config(cfg: Any, *, with_reference: bool) -> Workload:
    """The :class:`Workload` of a ``RunConfig``: GRPO from ``grpo.*`` and
    ``trainer.prompts_per_step``; SFT from ``trainer.sft_batch_size`` with ``grpo.max_new_tokens``
    as the bound on the answer's tokens (the SFT answer is a few dozen tokens)."""
    if cfg.method == "grpo":
        g, prompts, old = cfg.grpo.num_generations, cfg.trainer.prompts_per_step, cfg.grpo.mu > 1
    elif cfg.method == "sft":
        g, prompts, old = 1, cfg.trainer.sft_batch_size, False
    else:
        raise ValueError(f"method={cfg.method!r} trains nothing: a memory plan needs grpo or sft")
    return Workload(
        method=cfg.method, max_pixels=cfg.dataset.max_pixels,
        prompt_text_tokens=cfg.engine.auto_prompt_text_tokens,
        completion_tokens=cfg.grpo.max_new_tokens, micro_batch=cfg.model.micro_batch_size,
        num_generations=g, prompts_per_step=prompts,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        freeze_vision=cfg.model.freeze_vision, attn_implementation=cfg.model.attn_implementation,
        with_reference=with_reference, old_policy_forward=old,
        lora_rank=cfg.peft.r if cfg.peft.kind == "lora" else 0,
        lora_targets=tuple(cfg.peft.target_modules) if cfg.peft.kind == "lora" else (),
        lora_vision=cfg.peft.kind == "lora" and cfg.peft.include_vision,
        shared_prefix_update=cfg.method == "grpo" and cfg.grpo.shared_prefix_update,
        compile_decode=cfg.method == "grpo" and cfg.grpo.compile_decode,
    )


def lora_parameter_count(shape: ModelShape, *, r: int, target_modules: Sequence[str],
                         include_vision: bool) -> int:
    """Adapter parameters of LoRA rank ``r``: r (in + out) per adapted linear layer (A [r, in],
    B [out, r]); the language model's ``target_modules`` in every decoder layer, and with
    ``include_vision`` every linear layer of the vision tower (qkv, proj, gate/up/down per block)
    and of its merger (medloc.models.lora.lora_target_names picks the same layers)."""
    h, f, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_dim
    text = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    unknown = [t for t in target_modules if t not in text]
    if unknown:
        raise ValueError(f"peft.target_modules {unknown}: the plan knows {sorted(text)}")
    count = shape.layers * sum(r * sum(text[t]) for t in target_modules)
    if include_vision:
        hv, fv, m = shape.vision_hidden, shape.vision_intermediate, shape.merge_size ** 2 * shape.vision_hidden
        block = (hv + 3 * hv) + (hv + hv) + 2 * (hv + fv) + (fv + hv)  # qkv, proj, gate, up, down
        merger = (m + m) + (m + shape.hidden)  # mlp.0 [m, m], mlp.2 [h, m]
        count += r * (shape.vision_depth * block + merger)
    return count


def trained_parameters(shape: ModelShape, workload: Workload) -> tuple[int, int, bool]:
    """(weights N, trainable T, whether a reference copy is held) of a run: full fine-tuning N, N
    (minus the tower when frozen), beta > 0; LoRA N + A, A, no copy."""
    wl = workload
    if wl.lora_rank > 0:
        a = lora_parameter_count(shape, r=wl.lora_rank, target_modules=wl.lora_targets,
                                 include_vision=wl.lora_vision)
        return shape.n_params + a, a, False
    return (shape.n_params, shape.n_params - (shape.n_vision_params if wl.freeze_vision else 0),
            wl.with_reference)


def tower_trains(workload: Workload) -> bool:
    """Whether the vision tower needs a gradient in the update (not frozen; under LoRA only when
    it carries adapters)."""
    if workload.freeze_vision:
        return False
    return workload.lora_rank == 0 or workload.lora_vision


def image_tokens(max_pixels: int, *, patch_size: int, merge_size: int) -> int:
    """Language-model tokens of the largest image the processor makes: ``smart_resize`` keeps the
    area at most ``max_pixels`` with both sides multiples of patch x merge (28), and each
    (patch x merge)^2 block becomes one token: 1,003,520 pixels -> 1,280 tokens."""
    return max(1, max_pixels // (patch_size * merge_size) ** 2)


# ---------------------------------------------------------------------------------------------
# activations, KV cache, logits (pure arithmetic; bytes)
# ---------------------------------------------------------------------------------------------


def layer_bytes_per_token(*, hidden: int, intermediate: int, kv_dim: int, act_bytes: int) -> int:
    """Bytes one transformer layer (Qwen2.5-VL's decoder layer or vision block) keeps for its
    backward, per token, as autograd saves them; the same bounds what it allocates at once in a
    no-grad forward.

        2 RMSNorms          2 (4 + 2w) h  float32 input (for the variance), the normalised value
                                          cast back (kept by the weight's product) and the
                                          product (kept by the next linear layers)
        q after rotary      w h
        k after rotary, v   2 w kv_dim    as attention sees them (``attention_kv_dim``)
        attention output    2 w h         the kernel's output and o_proj's contiguous input
        SwiGLU MLP          4 w f         gate, silu(gate), up, silu(gate) * up
    (flash / memory-efficient attention keeps nothing quadratic; eager: ``eager_scores_bytes``.)
    """
    return (2 * (4 + 2 * act_bytes) * hidden + act_bytes * hidden + 2 * act_bytes * kv_dim
            + 2 * act_bytes * hidden + 4 * act_bytes * intermediate)


def attention_kv_dim(shape: ModelShape, attn: str) -> int:
    """Width of the keys and values the decoder's attention keeps. transformers repeats the
    grouped key/value heads to all heads for sdpa with a mask (training batches are padded) and
    for eager attention; flash-attention takes the grouped heads as they are. "auto" counts as
    sdpa (it resolves to flash-attention only where flash-attn is installed)."""
    if _attention_kind(attn) == "quadratic" or attn in ("auto", "sdpa"):
        return shape.heads * shape.head_dim
    if attn == "flash_attention_2":
        return shape.kv_dim
    raise ValueError(f"attn_implementation={attn!r}: expected one of {get_args(Attention)}")


def eager_scores_bytes(*, rows: int, heads: int, queries: int, keys: int, act_bytes: int) -> int:
    """Attention probabilities one eager-attention layer keeps: the float32 softmax and its copy
    in the model's dtype, [rows, heads, queries, keys]. sdpa and flash-attention keep none."""
    return rows * heads * queries * keys * (4 + act_bytes)


def stack_training_bytes(*, tokens: int, layers: int, hidden: int, layer_per_token: int,
                         layer_scores: int, act_bytes: int, checkpointing: bool) -> int:
    """Activation bytes of a stack of ``layers`` layers in a forward + backward over ``tokens``.

    With gradient checkpointing each layer keeps its input (w h per token) and one layer at a time
    is recomputed in the backward, beside its gradients (about as large): layers x w h + 2 x one
    layer. Without it every layer keeps all it saves, and the backward of a layer adds its
    gradients: (layers + 1) x one layer. Both add the hidden-state gradient in and out of a layer
    (2 w h per token). ``layer_scores``: one layer's bytes beyond ``layer_per_token`` per token
    (eager attention's probabilities; the shared-prefix completion pass's keys/values over the
    prompt)."""
    kept, backward = stack_training_parts(
        tokens=tokens, layers=layers, hidden=hidden, layer_per_token=layer_per_token,
        layer_scores=layer_scores, act_bytes=act_bytes, checkpointing=checkpointing)
    return kept + backward


def stack_training_parts(*, tokens: int, layers: int, hidden: int, layer_per_token: int,
                         layer_scores: int, act_bytes: int, checkpointing: bool) -> tuple[int, int]:
    """:func:`stack_training_bytes` as (kept from the forward to the backward, the backward's own
    transient bytes: the layer being recomputed or differentiated and the hidden-state gradients).
    Two forwards whose backwards run one after the other keep both ``kept`` and the larger
    ``backward``."""
    one_layer = tokens * layer_per_token + layer_scores
    residual_grads = 2 * act_bytes * hidden * tokens
    if checkpointing:
        return layers * act_bytes * hidden * tokens, 2 * one_layer + residual_grads
    return layers * one_layer, one_layer + residual_grads


def micro_batch_prompts(*, rows: int, micro_batch: int, group: int) -> int:
    """The most prompts any micro-batch of ``rows`` rows holds (row r shows prompt r // group;
    micro-batches of ``micro_batch`` consecutive rows, as ``GRPOTrainer.update`` cuts them): the
    images its trainable tower runs on and the prompts of its shared-prefix pass. A micro-batch
    that splits a group holds a part of it (one more prompt than whole groups would)."""
    if min(rows, micro_batch, group) < 1:
        raise ValueError(f"rows={rows}, micro_batch={micro_batch}, group={group}: each must be >= 1")
    return max((min(s + micro_batch, rows) - 1) // group - s // group + 1
               for s in range(0, rows, micro_batch))


def stack_inference_bytes(*, tokens: int, hidden: int, layer_per_token: int, layer_scores: int,
                          act_bytes: int) -> int:
    """Bytes of a no-grad forward over ``tokens``: the hidden states in and out of a layer (2 w h
    per token) and one layer's temporaries at a time."""
    return 2 * act_bytes * hidden * tokens + tokens * layer_per_token + layer_scores


def llm_layer_per_token(shape: ModelShape, act_bytes: int, attn: str) -> int:
    return layer_bytes_per_token(hidden=shape.hidden, intermediate=shape.intermediate,
                                 kv_dim=attention_kv_dim(shape, attn), act_bytes=act_bytes)


def vision_layer_per_token(shape: ModelShape, act_bytes: int) -> int:
    """A vision block per patch (no grouped keys: k and v are as wide as the hidden size)."""
    return layer_bytes_per_token(hidden=shape.vision_hidden, intermediate=shape.vision_intermediate,
                                 kv_dim=shape.vision_hidden, act_bytes=act_bytes)


def _attention_kind(attn: str) -> str:
    """"quadratic" for eager attention, "linear" for the kernels that keep no probabilities."""
    if attn == "eager":
        return "quadratic"
    if attn in ("auto", "sdpa", "flash_attention_2"):  # auto resolves to sdpa or flash-attention
        return "linear"
    raise ValueError(f"attn_implementation={attn!r}: expected one of {get_args(Attention)}")


def llm_scores(shape: ModelShape, *, rows: int, seq: int, attn: str, act_bytes: int) -> int:
    """One decoder layer's eager attention probabilities over ``rows`` sequences of ``seq``."""
    if _attention_kind(attn) == "linear":
        return 0
    return eager_scores_bytes(rows=rows, heads=shape.heads, queries=seq, keys=seq,
                              act_bytes=act_bytes)


def vision_scores(shape: ModelShape, *, images: int, patches: int, attn: str, act_bytes: int,
                  full: bool) -> int:
    """One vision block's eager attention probabilities: over the whole image in a full-attention
    block, over windows of ``vision_window_patches`` otherwise."""
    if _attention_kind(attn) == "linear":
        return 0
    keys = patches if full else min(patches, shape.vision_window_patches)
    return eager_scores_bytes(rows=images, heads=shape.vision_heads, queries=patches, keys=keys,
                              act_bytes=act_bytes)


def vision_tower_bytes(shape: ModelShape, *, images: int, patches: int, attn: str,
                       act_bytes: int, grad: bool, checkpointing: bool) -> int:
    """The vision tower on ``images`` images of ``patches`` patches each: its blocks, plus the
    patch embedding's input (``patch_input`` values per patch) and the merger (RMSNorm (4 + w) hv
    and its MLP's input, GELU input and output, 3 w hv, per patch). Eager attention keeps
    probabilities over the whole image in the full-attention blocks and over windows elsewhere."""
    tokens = images * patches
    per_token = vision_layer_per_token(shape, act_bytes)
    common = {"images": images, "patches": patches, "attn": attn, "act_bytes": act_bytes}
    full = vision_scores(shape, **common, full=True) if shape.vision_full_blocks else 0
    window = vision_scores(shape, **common, full=False)
    one = max(full, window)  # the largest block's probabilities (0 unless eager)
    edges = tokens * (shape.patch_input * act_bytes + (4 + 4 * act_bytes) * shape.vision_hidden)
    if not grad:
        return edges + stack_inference_bytes(tokens=tokens, hidden=shape.vision_hidden,
                                             layer_per_token=per_token, layer_scores=one,
                                             act_bytes=act_bytes)
    stack = {"tokens": tokens, "layers": shape.vision_depth, "hidden": shape.vision_hidden,
                 "layer_per_token": per_token, "act_bytes": act_bytes}
    if checkpointing:
        return edges + stack_training_bytes(**stack, layer_scores=one, checkpointing=True)
    every_block = (shape.vision_full_blocks * full
                   + (shape.vision_depth - shape.vision_full_blocks) * window)
    return (edges + stack_training_bytes(**stack, layer_scores=0, checkpointing=False)
            + every_block + one)


def kv_cache_bytes(*, rows: int, slots: int, layers: int, kv_heads: int, head_dim: int,
                   act_bytes: int) -> int:
    """The static KV cache of generation: rows x slots x layers x 2 (keys, values) x kv_heads x
    head_dim x w (``generation._new_cache``: K = P + max_new_tokens slots per row)."""
    return rows * slots * layers * 2 * kv_heads * head_dim * act_bytes


# [N, V] float32-sized temporaries of one sampling step (generation.next_tokens): the logits,
# the banned-masked and temperature-scaled scores, top-p's sorted scores, its int64 order (two
# float32s), the cumulative mass, the probabilities and the log-probabilities.
SAMPLING_FLOAT32_COPIES = 8


def sampling_bytes(*, rows: int, vocab: int) -> int:
    return rows * vocab * 4 * SAMPLING_FLOAT32_COPIES


def logprob_chunk_rows(positions: int, vocab: int) -> int:
    """Rows per float32 chunk of ``grpo.loss.sampled_token_logprobs``."""
    from medloc.grpo.loss import LOGPROB_CHUNK_ELEMENTS

    return max(1, LOGPROB_CHUNK_ELEMENTS // max(1, positions * vocab))


def grpo_logits_bytes(*, rows: int, positions: int, vocab: int, act_bytes: int, grad: bool) -> int:
    """Logits of ``completion_logprobs`` at ``positions`` = L + 1 kept positions of ``rows`` rows.

    The model's logits [rows, L+1, V] in its dtype (w). With grad, the float32 copy of every chunk
    is kept by ``logsumexp`` for the backward (4 bytes per logit), and the backward forms the
    logits' gradient in the model's dtype while those are freed: w + 4 per logit. Without grad,
    three float32 chunks at most (the cast, the masked scores, logsumexp's exponentials)."""
    logits = rows * positions * vocab
    if grad:
        return logits * (act_bytes + 4)
    chunk = min(rows, logprob_chunk_rows(positions, vocab)) * positions * vocab
    return logits * act_bytes + 3 * 4 * chunk


def shared_prefix_logits_bytes(*, rows: int, completion: int, vocab: int, act_bytes: int,
                               grad: bool) -> int:
    """Logits of ``shared_prefix_logprobs`` for ``rows`` rows of ``completion`` = L tokens: the
    completion pass's own [rows, L-1, V] (w) alive beside their concatenation with the prefix's
    last position [rows, L, V], which ``sampled_token_logprobs`` takes as
    :func:`grpo_logits_bytes` does at L positions."""
    return (rows * (completion - 1) * vocab * act_bytes
            + grpo_logits_bytes(rows=rows, positions=completion, vocab=vocab,
                                act_bytes=act_bytes, grad=grad))


def sft_logits_bytes(*, positions: int, vocab: int, act_bytes: int) -> int:
    """``medloc.sft``'s logits at the M = ``positions`` supervised positions only ([M, V],
    ``logits_to_keep``): the model's logits (w, kept through the backward), each chunk's float32
    log-softmax kept for the backward (4 per logit: the chunks together cover all M), the logits'
    gradient in the backward (w); and one chunk of ``CE_CHUNK_ELEMENTS`` at a time in float32,
    its copy in the forward or its gradient in the backward, with a temporary as large (8 per
    chunk element)."""
    from medloc.grpo.loss import CE_CHUNK_ELEMENTS

    chunk = min(positions, max(1, CE_CHUNK_ELEMENTS // max(1, vocab))) * vocab
    return positions * vocab * (2 * act_bytes + 4) + 8 * chunk


# ---------------------------------------------------------------------------------------------
# model states per GPU under one plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes per GPU under one plan (section 1 and 2 of the module docstring)."""

    weights: int
    grads: int
    optimizer: int
    reference: int
    generation_gather: int  # stage 3: the full policy gathered for sampling (0 otherwise)
    zero3_working_grad: int  # stage 3 update: the gathered layer + its gradient (0 otherwise)
    zero3_working_nograd: int  # stage 3 no-grad forward: the gathered layer (0 otherwise)

    @property
    def update(self) -> int:
        """What DeepSpeed's estimators count: weights, gradients, optimizer side (+ reference and
        the stage-3 working layer)."""
        return self.weights + self.grads + self.optimizer + self.reference + self.zero3_working_grad


def model_state_bytes(plan: ZeroPlan, *, n_params: int, n_trainable: int, bpp: BytesPerParam,
                      world_size: int, with_reference: bool,
                      largest_module_params: int = 0) -> ModelStates:
    """Bytes per GPU of the model states under ``plan`` (accounting in the module docstring)."""
    if not 0 <= n_trainable <= n_params:
        raise ValueError(f"need 0 <= n_trainable <= n_params, got {n_trainable}, {n_params}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if plan.offload_params and plan.stage != 3:
        raise ValueError(f"{plan.label}: offload_params needs stage 3")
    w, s = world_size, plan.stage
    weights = n_params * bpp.weights  # stage 0-2: a full replica on every GPU
    reference = n_params * bpp.weights if with_reference else 0
    if s == 3:
        weights, reference = math.ceil(weights / w), math.ceil(reference / w)
    gather = 0
    if s == 3:  # Engine.generation_context gathers every parameter of the policy at once
        full = n_params * bpp.weights
        gather = full + (weights if plan.offload_params else 0)  # + partitions staged from CPU
    if plan.offload_params:  # in CPU memory
        weights, reference = 0, 0
    grads = n_trainable * bpp.grads
    grads = math.ceil(grads / w) if s >= 2 else grads
    optimizer = n_trainable * bpp.optimizer
    optimizer = math.ceil(optimizer / w) if s >= 1 else optimizer
    if plan.offload_optimizer:  # ZeRO-Offload: gradients and optimizer side in CPU memory
        grads, optimizer = 0, 0
    working_grad = largest_module_params * (bpp.weights + bpp.grads) if s == 3 else 0
    working_nograd = largest_module_params * bpp.weights if s == 3 else 0
    return ModelStates(weights=weights, grads=grads, optimizer=optimizer, reference=reference,
                       generation_gather=gather, zero3_working_grad=working_grad,
                       zero3_working_nograd=working_nograd)


def host_terms(plan: ZeroPlan, *, n_params: int, n_trainable: int, largest_module_params: int,
               bpp: BytesPerParam, world_size: int, ranks_per_node: int,
               with_reference: bool) -> tuple[tuple[str, int], ...]:
    """Host RAM per node under ``plan``: (term, bytes), R processes' CPU-side bytes each."""
    if not 1 <= ranks_per_node <= world_size:
        raise ValueError(f"ranks_per_node={ranks_per_node} must be in [1, world_size={world_size}]")
    r, w = ranks_per_node, world_size
    terms = []
    if plan.offload_optimizer:
        terms.append(("optimizer offload (fp32 master, moments, gradients; pinned)",
                      r * math.ceil(n_trainable * bpp.optimizer / w)))
    if plan.offload_params:
        terms.append(("parameter offload (policy)", r * math.ceil(n_params * bpp.weights / w)))
        if with_reference:
            terms.append(("parameter offload (reference)",
                          r * math.ceil(n_params * bpp.weights / w)))
    # Each process builds the model on the host before its GPU gets it; zero.Init (stage 3)
    # partitions each module as soon as it is built.
    loaded = n_params if plan.stage < 3 else largest_module_params
    terms.append(("model load (each process)", r * loaded * bpp.weights))
    return tuple(terms)


# ---------------------------------------------------------------------------------------------
# phases of a step and the plan of one candidate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One phase of a step: the bytes per GPU alive at its peak, term by term."""

    name: str
    terms: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.terms)


def gpu_phases(plan: ZeroPlan, *, shape: ModelShape, workload: Workload, bpp: BytesPerParam,
               world_size: int) -> tuple[Phase, ...]:
    """The per-GPU phases of one training step under ``plan`` (section 4 of the docstring)."""
    wl, sh, act = workload, shape, bpp.weights
    n_weights, n_trainable, reference_copy = trained_parameters(sh, wl)
    states = model_state_bytes(plan, n_params=n_weights, n_trainable=n_trainable, bpp=bpp,
                               world_size=world_size, with_reference=reference_copy,
                               largest_module_params=sh.largest_module_params)
    tokens_i = image_tokens(wl.max_pixels, patch_size=sh.patch_size, merge_size=sh.merge_size)
    patches = tokens_i * sh.merge_size ** 2  # vision-tower tokens per image
    p = tokens_i + wl.prompt_text_tokens  # P
    length = wl.completion_tokens  # L
    seq = p + length  # P + L
    b = math.ceil(wl.prompts_per_step / world_size)  # prompts per process
    rows = b * wl.num_generations  # N_rows
    mb = min(wl.micro_batch, rows)
    b_mb = micro_batch_prompts(rows=rows, micro_batch=wl.micro_batch, group=wl.num_generations)
    ckpt, attn = wl.gradient_checkpointing, wl.attn_implementation
    shared = wl.method == "grpo" and wl.shared_prefix_update
    llm_per_token = llm_layer_per_token(sh, act, attn)
    kv = {"layers": sh.layers, "kv_heads": sh.kv_heads, "head_dim": sh.head_dim, "act_bytes": act}
    # the keys/values the completion pass's attention sees over the prompt, one layer's worth
    prefix_attention = mb * p * 2 * attention_kv_dim(sh, attn) * act
    completion_scores = 0 if _attention_kind(attn) == "linear" else eager_scores_bytes(
        rows=mb, heads=sh.heads, queries=length - 1, keys=seq - 1, act_bytes=act)
    resident = (("weights", states.weights), ("optimizer", states.optimizer),
                ("reference", states.reference))
    feats = (f"image features: {b} image(s), kept to the update", b * tokens_i * sh.hidden * act)
    slots = seq  # K
    if wl.compile_decode:  # the compiled step's cache length, rounded up (generation.py)
        from medloc.generation import compiled_cache_len

        slots = compiled_cache_len(p, length, True)
    # compile_decode: the decode step's N x K static cache stays allocated between rollouts
    # (generation._decode_cache); every phase but decode (where it is the cache) holds it too.
    kept_cache = ((f"compiled decode's KV cache, kept: {rows} rows x {slots} slots",
                   kv_cache_bytes(rows=rows, slots=slots, **kv)),) if wl.compile_decode else ()

    def shared_forward_terms(grad: bool) -> list[tuple[str, int]]:
        """The prefix pass (b_mb prompts x P) and completion pass (mb rows x (L-1)) of
        ``shared_prefix_logprobs``: activations, the prefix keys/values, their per-row copy."""
        scores_prefix = llm_scores(sh, rows=b_mb, seq=p, attn=attn, act_bytes=act)
        if grad:
            common = {"layers": sh.layers, "hidden": sh.hidden, "layer_per_token": llm_per_token,
                      "act_bytes": act, "checkpointing": ckpt}
            kept_p, back_p = stack_training_parts(tokens=b_mb * p, layer_scores=scores_prefix,
                                                  **common)
            kept_c, back_c = stack_training_parts(
                tokens=mb * (length - 1), layer_scores=completion_scores + prefix_attention,
                **common)
            label = f"checkpointing {'on' if ckpt else 'off'}"
            acts = kept_p + kept_c + max(back_p, back_c)
        else:
            label = "no grad"
            acts = max(
                stack_inference_bytes(tokens=b_mb * p, hidden=sh.hidden,
                                      layer_per_token=llm_per_token, layer_scores=scores_prefix,
                                      act_bytes=act),
                stack_inference_bytes(tokens=mb * (length - 1), hidden=sh.hidden,
                                      layer_per_token=llm_per_token,
                                      layer_scores=completion_scores + prefix_attention,
                                      act_bytes=act))
        with_grad = "with grad" if grad else "no grad"
        return [
            (f"activations: prefix {b_mb} x {p} + completions {mb} x {length - 1} tokens, {label}",
             acts),
            (f"prefix keys/values: {b_mb} x {p}, every layer, {with_grad}",
             kv_cache_bytes(rows=b_mb, slots=p, **kv)),
            (f"prefix keys/values repeated per row: {mb} x {p}, every layer",
             kv_cache_bytes(rows=mb, slots=p, **kv)),
            (f"logits: {mb} x {length} x {sh.vocab} (+ the completion pass's {length - 1})",
             shared_prefix_logits_bytes(rows=mb, completion=length, vocab=sh.vocab,
                                        act_bytes=act, grad=grad)),
        ]

    phases = []
    if wl.method == "grpo":
        gen_states = (*resident, ("generation gather", states.generation_gather))
        phases.append(Phase("generate: vision tower", (*gen_states, *kept_cache, (
            f"vision tower: {b} image(s) x {patches} patches, no grad",
            vision_tower_bytes(sh, images=b, patches=patches, attn=attn,
                               act_bytes=act, grad=False, checkpointing=False)))))
        phases.append(Phase("generate: prefill", (*gen_states, *kept_cache, feats, (
            f"prefill: {b} x {p} tokens, no grad",
            stack_inference_bytes(tokens=b * p, hidden=sh.hidden, layer_per_token=llm_per_token,
                   layer_scores=llm_scores(sh, rows=b, seq=p, attn=attn,
                                           act_bytes=act), act_bytes=act)),
            (f"KV cache: {b} rows x {slots} slots", kv_cache_bytes(rows=b, slots=slots, **kv)))))
        phases.append(Phase("generate: decode", (*gen_states, feats, (
            f"KV cache: {rows} rows x {slots} slots", kv_cache_bytes(rows=rows, slots=slots, **kv)),
            (f"sampling: {rows} x {sh.vocab} logits", sampling_bytes(rows=rows, vocab=sh.vocab)))))
        if wl.with_reference or wl.old_policy_forward:
            name = "reference forward" if wl.with_reference else "old-policy forward"
            terms = [*resident, ("ZeRO-3 gathered layer", states.zero3_working_nograd),
                     *kept_cache, feats]
            if wl.with_reference and not wl.freeze_vision:  # the reference's own tower per image
                terms.append((f"reference vision tower: {b} image(s), no grad",
                              vision_tower_bytes(sh, images=b, patches=patches,
                                                 attn=attn, act_bytes=act,
                                                 grad=False, checkpointing=False)))
                terms.append((f"reference image features: {b} image(s)", b * tokens_i * sh.hidden * act))
            if shared:
                terms.extend(shared_forward_terms(grad=False))
            else:
                terms.append((f"forward: {mb} x {seq} tokens, no grad",
                              stack_inference_bytes(tokens=mb * seq, hidden=sh.hidden, layer_per_token=llm_per_token,
                                     layer_scores=llm_scores(sh, rows=mb, seq=seq, attn=attn,
                                                             act_bytes=act), act_bytes=act)))
                terms.append((f"logits: {mb} x {length + 1} x {sh.vocab}",
                              grpo_logits_bytes(rows=mb, positions=length + 1,
                                                vocab=sh.vocab, act_bytes=act, grad=False)))
            phases.append(Phase(name, tuple(terms)))
    update = [("weights", states.weights), ("grads", states.grads),
              ("optimizer", states.optimizer), ("reference", states.reference),
              ("ZeRO-3 gathered layer + gradient", states.zero3_working_grad), *kept_cache]
    if wl.method == "grpo":
        update.append(feats)
        if wl.with_reference and not wl.freeze_vision:
            update.append((f"reference image features: {b} image(s)", b * tokens_i * sh.hidden * act))
    if shared:
        update.extend(shared_forward_terms(grad=True)[:3])
    else:
        update.append((f"activations: {mb} x {seq} tokens, checkpointing {'on' if ckpt else 'off'}",
                       stack_training_bytes(
                           tokens=mb * seq, layers=sh.layers, hidden=sh.hidden,
                           layer_per_token=llm_per_token,
                           layer_scores=llm_scores(sh, rows=mb, seq=seq, attn=attn,
                                                   act_bytes=act),
                           act_bytes=act, checkpointing=ckpt)))
    if not wl.freeze_vision:  # the tower runs in the update, once per image of a micro-batch
        grad = tower_trains(wl)  # LoRA without vision adapters: a frozen tower, no grad
        with_grad = "with" if grad else "without"
        tower_label = (f"vision tower {with_grad} grad: {b_mb} image(s), once per image per "
                       "micro-batch")
        update.append((tower_label,
                       vision_tower_bytes(sh, images=b_mb, patches=patches,
                                          attn=attn, act_bytes=act, grad=grad,
                                          checkpointing=ckpt and grad)))
    if wl.method == "grpo":
        if shared:
            update.append(shared_forward_terms(grad=True)[3])
        else:
            update.append((f"logits: {mb} x {length + 1} x {sh.vocab}",
                           grpo_logits_bytes(rows=mb, positions=length + 1,
                                             vocab=sh.vocab, act_bytes=act, grad=True)))
    elif wl.method == "sft":
        m = mb * length  # supervised positions: at most L answer tokens per row
        update.append((f"logits: {m} supervised positions x {sh.vocab}",
                       sft_logits_bytes(positions=m, vocab=sh.vocab, act_bytes=act)))
    else:
        raise ValueError(f"method={wl.method!r}: expected one of {get_args(Method)}")
    phases.append(Phase("update", tuple(update)))
    return tuple(phases)


@dataclass(frozen=True)
class CandidatePlan:
    """One candidate's plan: per-GPU phases, host terms, and whether each fits."""

    plan: ZeroPlan
    phases: tuple[Phase, ...]
    host: tuple[tuple[str, int], ...]
    reserve_bytes: int
    host_reserve_bytes: int
    device_bytes: int | None  # None: no GPU, not compared
    host_bytes: int | None  # None: host RAM unknown, not compared

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda ph: ph.total)

    @property
    def gpu_need(self) -> int:
        return self.peak_phase.total + self.reserve_bytes

    @property
    def host_need(self) -> int:
        return sum(b for _, b in self.host) + self.host_reserve_bytes

    @property
    def gpu_fits(self) -> bool:
        return self.device_bytes is None or self.gpu_need <= self.device_bytes

    @property
    def host_fits(self) -> bool:
        return self.host_bytes is None or self.host_need <= self.host_bytes

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.plan), "label": self.plan.label,
            "phases": {ph.name: {"total": ph.total, "terms": dict(ph.terms)} for ph in self.phases},
            "peak_phase": self.peak_phase.name, "gpu_need_bytes": self.gpu_need,
            "reserve_bytes": self.reserve_bytes, "gpu_fits": self.gpu_fits,
            "host_terms": dict(self.host), "host_need_bytes": self.host_need,
            "host_reserve_bytes": self.host_reserve_bytes, "host_fits": self.host_fits,
        }


def evaluate(plan: ZeroPlan, *, shape: ModelShape, workload: Workload, precision: str,
             world_size: int, ranks_per_node: int, reserve_bytes: int, host_reserve_bytes: int,
             device_bytes: int | None, host_bytes: int | None) -> CandidatePlan:
    """The plan of one candidate."""
    bpp = bytes_per_param(precision)
    n_weights, n_trainable, reference_copy = trained_parameters(shape, workload)
    return CandidatePlan(
        plan=plan,
        phases=gpu_phases(plan, shape=shape, workload=workload, bpp=bpp, world_size=world_size),
        host=host_terms(plan, n_params=n_weights, n_trainable=n_trainable,
                        largest_module_params=shape.largest_module_params, bpp=bpp,
                        world_size=world_size, ranks_per_node=ranks_per_node,
                        with_reference=reference_copy),
        reserve_bytes=reserve_bytes, host_reserve_bytes=host_reserve_bytes,
        device_bytes=device_bytes, host_bytes=host_bytes,
    )


def choose(evaluated: Sequence[CandidatePlan]) -> CandidatePlan:
    """The first (cheapest) candidate that fits both the GPU and the host; when none does, the
    most frugal one (its ``fits`` is False and the start line says so)."""
    if not evaluated:
        raise ValueError("no candidates to choose from")
    return next((c for c in evaluated if c.fits), evaluated[-1])


# ---------------------------------------------------------------------------------------------
# inputs read at start: the GPU's memory, the host's RAM, processes per node
# ---------------------------------------------------------------------------------------------


def device_memory_bytes() -> tuple[int | None, str]:
    """(total memory of this process's GPU, its name), or (None, "cpu") without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
    return int(props.total_memory), str(props.name)


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_bytes(meminfo: str | Path = "/proc/meminfo",
                      cgroup_limits: Sequence[str | Path] = _CGROUP_LIMITS) -> int | None:
    """The host RAM this process may use: MemTotal of ``meminfo``, or the cgroup's memory limit
    when lower (a scheduler's job limit, e.g. SLURM); None when neither can be read."""
    total = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024  # kB
                break
    except OSError:
        pass
    for path in cgroup_limits:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            total = int(text) if total is None else min(total, int(text))
    return total


def ranks_per_node(world_size: int) -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, the DeepSpeed launcher's LOCAL_SIZE,
    else the world size (one node)."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(var, "").isdigit():
            return max(1, min(world_size, int(os.environ[var])))
    return world_size


# ---------------------------------------------------------------------------------------------
# the decision of a run
# ---------------------------------------------------------------------------------------------


def _gib(b: int) -> str:
    return f"{b / GIB:.1f}"


def _size(b: int) -> str:
    return f"{b / GIB:.1f} GiB" if b >= GIB // 10 or b == 0 else f"{b / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.2f}M"


@dataclass(frozen=True)
class ZeroDecision:
    """What the run uses and why: logged at start and recorded in run_info.json."""

    plan: ZeroPlan
    chosen_by: str  # "auto" or "config"
    chosen: CandidatePlan
    candidates: tuple[CandidatePlan, ...]  # every candidate evaluated (auto), or the named one
    n_params: int
    n_trainable: int
    precision: str
    world_size: int
    ranks_per_node: int
    device: str

    @property
    def fits(self) -> bool:
        return self.chosen.fits

    @property
    def device_bytes(self) -> int | None:
        return self.chosen.device_bytes

    @property
    def host_bytes(self) -> int | None:
        return self.chosen.host_bytes

    def line(self) -> str:
        """One line: the stage, the per-GPU peak with its terms, the host RAM, the verdicts."""
        c = self.chosen
        how = ("engine.zero_stage=auto" if self.chosen_by == "auto"
               else f"engine.zero_stage={self.plan.stage}")
        peak = c.peak_phase
        terms = ", ".join(f"{name.split(':')[0]} {_size(b)}" for name, b in peak.terms if b)
        host = ", ".join(f"{name} {_size(b)}" for name, b in c.host if b)
        parts = [
            (f"[engine] {self.plan.label} ({how}) on {self.world_size} process(es): "
             f"{_count(self.n_params)} params ({_count(self.n_trainable)} trainable, "
             f"{self.precision})"),
            (f"per-GPU peak {_size(peak.total)} in {peak.name} ({terms}) + reserve "
             f"{_size(c.reserve_bytes)}"),
        ]
        if c.device_bytes is None:
            parts.append("no GPU: memory not compared")
        else:
            parts.append(f"vs {_size(c.device_bytes)} of {self.device}: "
                         + ("fits" if c.gpu_fits else "DOES NOT FIT the GPU"))
            parts.append(f"host {_size(c.host_need - c.host_reserve_bytes)} per node ({host}) + "
                         f"reserve {_size(c.host_reserve_bytes)} vs "
                         + ("unknown RAM: not compared" if c.host_bytes is None else
                            f"{_size(c.host_bytes)}: "
                            + ("fits" if c.host_fits else "DOES NOT FIT the host RAM")))
            if not c.fits:
                parts.append("nothing fits: the most frugal stage is used anyway"
                             if self.chosen_by == "auto"
                             else "engine.zero_stage=auto picks one that fits, if any does")
        return " | ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.plan), "label": self.plan.label, "chosen_by": self.chosen_by,
            "fits": self.fits, "n_params": self.n_params, "n_trainable": self.n_trainable,
            "precision": self.precision, "world_size": self.world_size,
            "ranks_per_node": self.ranks_per_node, "device": self.device,
            "device_bytes": self.device_bytes, "host_bytes": self.host_bytes,
            "plan_bytes": self.chosen.as_dict(),
        }


def decide(*, zero_stage: int | str, offload_optimizer: bool, offload_params: bool,
           precision: str, model_path: str | Path, world_size: int, workload: Workload,
           reserve_gib: float, host_reserve_gib: float,
           device: tuple[int | None, str] | None = None, host_bytes: int | None | str = "read",
           shape: ModelShape | None = None, ranks: int | None = None) -> ZeroDecision:
    """Resolve ``engine.zero_stage`` (a stage, or "auto") for this run. A named stage is used as
    configured (with its plan, for the log); "auto" applies :func:`choose` over ``CANDIDATES``.

    ``device``: (memory bytes, name) of the GPU, None reads this process's GPU. ``host_bytes``:
    the host's RAM per node, "read" reads it (:func:`host_memory_bytes`), None does not compare
    it. ``reserve_gib``: per GPU; ``host_reserve_gib``: per process (R of them per node). ``shape``:
    the model's shape, None reads the checkpoint in ``model_path``. ``ranks``: processes per node,
    None reads the launcher's environment (:func:`ranks_per_node`).
    """
    shape = shape_from_checkpoint(model_path) if shape is None else shape
    device_bytes, device_name = device_memory_bytes() if device is None else device
    if host_bytes == "read":
        host = host_memory_bytes()
    elif host_bytes is None or isinstance(host_bytes, int):
        host = host_bytes
    else:
        raise ValueError(f"host_bytes={host_bytes!r}: expected bytes, None or 'read'")
    r = ranks_per_node(world_size) if ranks is None else ranks
    common = {"shape": shape, "workload": workload, "precision": precision, "world_size": world_size,
                  "ranks_per_node": r, "reserve_bytes": int(reserve_gib * GIB),
                  "host_reserve_bytes": r * int(host_reserve_gib * GIB), "device_bytes": device_bytes,
                  "host_bytes": host}
    if zero_stage == "auto":
        if device_bytes is None:  # no GPU: one pool of host memory, nothing to fit
            evaluated = (evaluate(CANDIDATES[0], **common),)
            chosen = evaluated[0]
        else:
            evaluated = tuple(evaluate(p, **common) for p in CANDIDATES)
            chosen = choose(evaluated)
        by = "auto"
    else:
        chosen = evaluate(ZeroPlan(int(zero_stage), offload_optimizer, offload_params), **common)
        evaluated, by = (chosen,), "config"
    n_weights, n_trainable, _ = trained_parameters(shape, workload)
    return ZeroDecision(plan=chosen.plan, chosen_by=by, chosen=chosen, candidates=evaluated,
                        n_params=n_weights, n_trainable=n_trainable, precision=precision,
                        world_size=world_size, ranks_per_node=r, device=device_name)


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


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# The "what fits where" grid of docs/memory_plans.md: (label, GPUs, GiB torch reports per GPU).
# torch reports ~79.2 GiB for an 80 GB H100/A100 and ~139.8 GiB for a 141 GB H200.
GRID_MODELS = ("3b", "7b", "32b")
GRID_GPUS = (("1x80 GB", 1, 79.2), ("4x80 GB", 4, 79.2), ("8x80 GB", 8, 79.2),
             ("1x141 GB (H200)", 1, 139.8))
GRID_HOSTS = (512, 128)


def compose_run_config(overrides: Sequence[str]) -> Any:
    """The validated ``RunConfig`` of ``conf/`` with Hydra ``overrides`` (read, never modify)."""
    return _compose(tuple(overrides))


@functools.lru_cache(maxsize=16)
def _compose(overrides: tuple[str, ...]) -> Any:
    from hydra import compose, initialize_config_dir

    from medloc.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


def _preset_overrides(preset: str, model: str) -> list[str]:
    """Hydra overrides of a preset: "paper" = conf/preset/paper.yaml on a real dataset's pixel
    budget (conf/dataset/ham10000.yaml: max_pixels 1,003,520) with the named size's model config;
    "embedded" = conf/preset/embedded.yaml."""
    if preset == "paper":
        out = ["preset=paper", "dataset=ham10000"]
    elif preset == "embedded":
        out = ["preset=embedded"]
    else:
        raise ValueError(f"--preset {preset!r}: expected paper or embedded")
    if model.lower() in NAMED_SHAPES:
        out.append(f"model=qwen2_5_vl_{model.lower()}")
    return out


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("method", args.method), ("dataset.max_pixels", args.max_pixels),
             ("grpo.max_new_tokens", args.max_new_tokens),
             ("model.micro_batch_size", args.micro_batch),
             ("grpo.num_generations", args.num_generations),
             ("trainer.prompts_per_step", args.prompts_per_step),
             ("model.gradient_checkpointing", args.gradient_checkpointing),
             ("model.freeze_vision", args.freeze_vision), ("model.precision", args.precision),
             ("model.attn_implementation", args.attn),
             ("engine.auto_prompt_text_tokens", args.prompt_text_tokens),
             ("engine.auto_reserve_gib", args.reserve_gib),
             ("engine.auto_host_reserve_gib_per_rank", args.host_reserve_gib_per_rank)]
    out = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in pairs
           if v is not None]
    if args.no_reference:
        out.append("grpo.beta=0")
    return out + list(args.override)


def plan_for(model: str, *, gpus: int, gpus_per_node: int | None, gpu_gib: float | None,
             host_gib: float | None, overrides: Sequence[str], zero_stage: int | str = "auto",
             offload_optimizer: bool = False, offload_params: bool = False) -> ZeroDecision:
    """The decision for ``model`` (a named size or a checkpoint folder) on ``gpus`` processes of
    ``gpu_gib`` GiB each (None: no GPU) with ``host_gib`` GiB of host RAM per node (None: not
    compared), under the config composed from ``overrides``."""
    cfg = compose_run_config(overrides)
    if model.lower() in NAMED_SHAPES or not Path(model).is_dir():
        shape = shape_from_table(model)
        path: str | Path = model
    else:
        shape, path = shape_from_checkpoint(model), Path(model)
    with_reference = cfg.method == "grpo" and cfg.grpo.beta > 0
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: need at least 1")
    r = gpus if gpus_per_node is None else gpus_per_node
    if not 1 <= r <= gpus:
        raise ValueError(f"--gpus-per-node {gpus_per_node}: need 1 <= it <= --gpus {gpus}")
    return decide(
        zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_params=offload_params,
        precision=cfg.model.precision, model_path=path, world_size=gpus,
        workload=workload_from_config(cfg, with_reference=with_reference),
        reserve_gib=cfg.engine.auto_reserve_gib,
        host_reserve_gib=cfg.engine.auto_host_reserve_gib_per_rank, device=(None if gpu_gib is None else int(gpu_gib * GIB), "GPU"),
        host_bytes=None if host_gib is None else int(host_gib * GIB), shape=shape, ranks=r)


def format_plan(d: ZeroDecision, *, markdown: bool) -> str:
    """Every candidate evaluated: its phases with their terms, its host RAM, and the choice."""
    lines = [d.line(), ""]
    for c in d.candidates:
        mark = "<- chosen" if c.plan == d.plan else ""
        verdict = ("fits" if c.fits else
                   "GPU does not fit" if not c.gpu_fits and c.host_fits else
                   "host RAM does not fit" if c.gpu_fits else "neither fits")
        if markdown:
            lines.append(f"### {c.plan.label}: {verdict} {mark}".rstrip())
            lines.append("")
            lines.append("| phase | per-GPU GiB | terms |")
            lines.append("|---|---:|---|")
            for ph in c.phases:
                terms = "; ".join(f"{n} {_size(b)}" for n, b in ph.terms if b)
                lines.append(f"| {ph.name} | {_gib(ph.total)} | {terms} |")
            host = "; ".join(f"{n} {_gib(b)}" for n, b in c.host if b)
            lines.append(f"| **peak + reserve** | **{_gib(c.gpu_need)}** | {c.peak_phase.name} + "
                         f"reserve {_gib(c.reserve_bytes)} |")
            lines.append(f"| host RAM per node | {_gib(c.host_need)} | {host}; reserve "
                         f"{_gib(c.host_reserve_bytes)} |")
            lines.append("")
        else:
            lines.append(f"{c.plan.label}: {verdict} {mark}".rstrip())
            for ph in c.phases:
                lines.append(f"  {ph.name:<24} {_gib(ph.total):>7} GiB")
                lines.extend(f"      {_size(b):>10}  {n}" for n, b in ph.terms if b)
            lines.append(f"  peak + reserve {_gib(c.gpu_need)} GiB per GPU"
                         + ("" if c.device_bytes is None else f" (of {_gib(c.device_bytes)})"))
            host = ", ".join(f"{n} {_gib(b)}" for n, b in c.host if b)
            lines.append(f"  host {_gib(c.host_need)} GiB per node ({host}, reserve "
                         f"{_gib(c.host_reserve_bytes)})"
                         + ("" if c.host_bytes is None else f" (of {_gib(c.host_bytes)})"))
            lines.append("")
    return "\n".join(lines)


def what_fits(*, preset: str, overrides: Sequence[str]) -> str:
    """The markdown "what fits where" table: GRID_MODELS x GRID_GPUS x GRID_HOSTS."""
    rows = [("| model | GPUs | host RAM | engine=auto picks | per-GPU peak + reserve (phase) "
            "| host RAM needed | fits |"), "|---|---|---:|---|---|---:|---|"]
    for model in GRID_MODELS:
        for label, gpus, gib in GRID_GPUS:
            for host in GRID_HOSTS:
                d = plan_for(model, gpus=gpus, gpus_per_node=None, gpu_gib=gib, host_gib=host,
                             overrides=[*_preset_overrides(preset, model), *overrides])
                c = d.chosen
                why = "yes" if c.fits else (
                    "no: GPU" if c.host_fits else "no: host RAM" if c.gpu_fits else
                    "no: GPU and host RAM")
                picks = c.plan.label if c.fits else f"none fits (most frugal: {c.plan.label})"
                rows.append(f"| {model.upper()} | {label} | {host} GiB | {picks} | "
                            f"{_gib(c.gpu_need)} of {_gib(c.device_bytes or 0)} GiB "
                            f"({c.peak_phase.name}) | {_gib(c.host_need)} GiB | {why} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m medloc.engine_plan",
        description="Print the memory plan of a run: every ZeRO candidate, its per-GPU phase "
                    "peaks with their terms, the host RAM it needs, whether it fits, the choice.")
    ap.add_argument("--model", default="3b",
                    help="3b, 7b, 32b (the released Qwen2.5-VL shapes) or a checkpoint folder")
    ap.add_argument("--gpus", type=int, default=1, help="processes (GPUs) in all")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="default: all on one node")
    ap.add_argument("--gpu-gib", type=float, default=None,
                    help="memory per GPU as torch reports it (80 GB cards: ~79.2); none: no GPU")
    ap.add_argument("--host-gib", type=float, default=None, help="host RAM per node; none: unchecked")
    ap.add_argument("--preset", default="paper", choices=("paper", "embedded"))
    ap.add_argument("--stage", default="auto", help="auto, or a stage (0-3) to show only that one")
    ap.add_argument("--offload-optimizer", action="store_true", help="with a named --stage")
    ap.add_argument("--offload-params", action="store_true", help="with --stage 3")
    ap.add_argument("--method", choices=get_args(Method), default=None)
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--num-generations", type=int, default=None)
    ap.add_argument("--prompts-per-step", type=int, default=None)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--no-reference", action="store_true", help="grpo.beta=0: no reference model")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--attn", choices=get_args(Attention), default=None)
    ap.add_argument("--prompt-text-tokens", type=int, default=None)
    ap.add_argument("--reserve-gib", type=float, default=None)
    ap.add_argument("--host-reserve-gib-per-rank", type=float, default=None)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="any other Hydra override, e.g. --override trainer.prompts_per_step=16")
    ap.add_argument("--markdown", action="store_true", help="the candidates as markdown tables")
    ap.add_argument("--what-fits", action="store_true",
                    help="the 'what fits where' table of docs/memory_plans.md (3B/7B/32B x "
                         "1x80, 4x80, 8x80 GB, 1x141 GB x 512/128 GiB host)")
    args = ap.parse_args(argv)
    try:
        overrides = [*_preset_overrides(args.preset, args.model), *_cli_overrides(args)]
        if args.what_fits:
            print(what_fits(preset=args.preset, overrides=_cli_overrides(args)))
            return 0
        stage: int | str = args.stage if args.stage == "auto" else int(args.stage)
        if stage == "auto" and (args.offload_optimizer or args.offload_params):
            raise ValueError("--offload-optimizer/--offload-params need a named --stage")
        d = plan_for(args.model, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                     gpu_gib=args.gpu_gib, host_gib=args.host_gib, overrides=overrides,
                     zero_stage=stage, offload_optimizer=args.offload_optimizer,
                     offload_params=args.offload_params)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(d, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
