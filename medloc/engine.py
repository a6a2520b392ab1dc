"""DeepSpeed engine: the only module of medloc that imports ``deepspeed``.

It owns: process-group start-up (gloo on CPU, NCCL on GPU), the DeepSpeed JSON config built from
explicit arguments, loading the policy (trainable) and the frozen reference model through
``HfDeepSpeedConfig`` + ``from_pretrained`` (building a model inside ``zero.Init`` by constructor
fails on this stack), ``generation_context()`` (gather ZeRO-3 partitions once and remove the
partition hooks while sampling: leaving the hooks on makes generation ~5x slower on CPU),
backward/step with explicit loss scaling, and checkpoints (engine state for resume + an ordinary
Hugging Face folder for evaluation).

Loss scaling contract (see ``Engine.backward``): the trainer hands in micro-batch losses that are
already normalised by a GLOBAL count (tokens or sequences over all micro-batches of all ranks), so
the per-step gradient is the SUM of micro-batch gradients over ranks. DeepSpeed by default divides
by the accumulation steps and averages over data-parallel ranks; both are undone here.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

Precision = Literal["fp32", "bf16"]


# ---------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start the process group once; return (rank, world_size).

    Under ``torchrun`` / the ``deepspeed`` launcher the rendezvous variables are set; a plain
    ``python -m medloc.train`` gets a one-process group on a free local port. DeepSpeed picks its
    CPU accelerator and gloo by itself when no GPU is present.
    """
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process). Returns a new tensor."""
    out = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_1d(t: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of equal length from every rank, in rank order."""
    t = t.detach().contiguous()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (e.g. the run directory)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------
# DeepSpeed config
# ---------------------------------------------------------------------------------------------


def deepspeed_config(
    *,
    zero_stage: int,
    precision: str,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON config as a dict, from explicit arguments only."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={zero_stage!r}: expected one of 0, 1, 2, 3")
    if precision not in get_args(Precision):
        raise ValueError(f"engine.precision={precision!r}: expected one of {get_args(Precision)}")
    if offload_params and zero_stage != 3:
        raise ValueError("engine.offload_params=true needs engine.zero_stage=3")
    if offload_optimizer and zero_stage < 1:
        raise ValueError("engine.offload_optimizer=true needs engine.zero_stage >= 1")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True,
                # Small models: keep every parameter partitioned but prefetch aggressively.
                "stage3_param_persistence_threshold": 0,
            }
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _inference_config(train_config: dict[str, Any]) -> dict[str, Any]:
    """Config for the frozen reference: ZeRO-3 partitions it like the policy, other stages keep a
    full replica (stage 0), as a reference needs neither gradients nor optimizer state."""
    stage = train_config["zero_optimization"]["stage"]
    cfg = {k: v for k, v in train_config.items() if k != "gradient_clipping"}
    cfg["zero_optimization"] = (
        {k: v for k, v in train_config["zero_optimization"].items() if k != "offload_optimizer"}
        if stage == 3
        else {"stage": 0}
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------


@dataclass
class EngineSpec:
    """Explicit arguments of :class:`Engine` (the trainer fills it from the Hydra config)."""

    model_path: str
    zero_stage: int = 3
    precision: str = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = False
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    with_reference: bool = True


def _torch_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Engine:
    """Policy (+ optional frozen reference) under DeepSpeed, with the few verbs the trainers use."""

    def __init__(self, spec: EngineSpec):
        from medloc.models.loading import disable_dropout, freeze_vision_tower, load_model

        self.spec = spec
        self.rank, self.world_size = init_distributed()
        self.device = device()
        self.config = deepspeed_config(
            zero_stage=spec.zero_stage,
            precision=spec.precision,
            micro_batch_size=spec.micro_batch_size,
            grad_accum_steps=spec.grad_accum_steps,
            world_size=self.world_size,
            grad_clip=spec.grad_clip,
            offload_optimizer=spec.offload_optimizer,
            offload_params=spec.offload_params,
        )
        dtype = _torch_dtype(spec.precision)
        # HfDeepSpeedConfig must stay alive while from_pretrained runs: under ZeRO-3 transformers
        # then loads the weights straight into partitions (zero.Init).
        self._hf_ds_config = HfDeepSpeedConfig(self.config)
        model = load_model(
            spec.model_path, dtype=dtype, attn_implementation=spec.attn_implementation
        )
        self.frozen_params = freeze_vision_tower(model) if spec.freeze_vision else 0
        # Train mode must not change the numbers: the update's log-probs are those of sampling
        # (eval mode). Qwen2.5-VL's dropouts are all 0 already; this makes it hold for any config.
        self.dropouts_disabled = disable_dropout(model)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Under ZeRO-3 a parameter's local tensor is a flat shard; its real shape is ds_shape.
        decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if spec.offload_optimizer:
            # Optimizer state in CPU memory is stepped by DeepSpeed's fused CPU AdamW (JIT-built
            # once, ~1-2 min); torch's AdamW there would be several times slower.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=spec.lr, betas=tuple(spec.betas),
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas))
        warmup = max(0, int(spec.warmup_steps))

        def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            # Built by DeepSpeed on its own (possibly wrapped) optimizer. Linear warmup, then flat.
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
            )

        self.policy, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        # The policy lives in train mode (load_model returns eval mode): transformers checkpoints a
        # layer only when `self.training`, so model.gradient_checkpointing would do nothing
        # otherwise. generation_context() switches to eval mode for sampling and back.
        self.policy.train()
        self._kept_since_step = 0  # micro-batches with a kept gradient since the last boundary
        self.reference = None
        if spec.with_reference:
            ref_config = _inference_config(self.config)
            self._hf_ds_ref_config = HfDeepSpeedConfig(ref_config)
            ref = load_model(spec.model_path, dtype=dtype, attn_implementation=spec.attn_implementation)
            disable_dropout(ref)
            ref.eval().requires_grad_(False)  # always eval mode: it is never trained
            if spec.zero_stage == 3:
                self.reference, *_ = deepspeed.initialize(model=ref, config=ref_config)
                self.reference.eval()
            else:
                self.reference = ref.to(self.device)
            self._hf_ds_config = HfDeepSpeedConfig(self.config)  # restore the policy's

    # -- model access ---------------------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        """The underlying Hugging Face model of the policy."""
        return self.policy.module

    def trainable_named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)

    @contextlib.contextmanager
    def generation_context(self) -> Iterator[torch.nn.Module]:
        """Yield the policy ready for ``generate``.

        ZeRO-3: gather every partition once and take the per-module partition hooks off while
        sampling (they would re-gather and release each layer for every generated token), then
        put them back. Other stages: the model itself.
        """
        module = self.module
        was_training = module.training
        module.eval()
        try:
            if self.spec.zero_stage != 3:
                yield module
                return
            offload = self.policy.optimizer.parameter_offload
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                for p in module.parameters():
                    p.ds_active_sub_modules.clear()
                offload._remove_module_hooks()
                try:
                    yield module
                finally:
                    offload.forward_hooks.clear()
                    offload.backward_hooks.clear()
                    offload.setup_zero_stage3_hooks()
        finally:
            module.train(was_training)

    # -- optimisation ---------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss that is already normalised by a global count.

        DeepSpeed averages gradients over data-parallel ranks; multiplying by world_size turns that
        average into the sum the global normalisation expects. ``scale_wrt_gas=False`` keeps
        DeepSpeed from dividing by the accumulation steps a second time.
        """
        self.policy.backward(loss * self.world_size, scale_wrt_gas=False)

    def backward_nothing(self) -> None:
        """Stand-in backward for a micro-batch whose loss is left out (non-finite on some rank).

        A zero that depends on no parameter: no gradient is added, but DeepSpeed still sees one
        backward per micro-batch, so what it does at the accumulation boundary's backward (the
        gradient all-reduce of ZeRO-0/1, the bucket flush of ZeRO-2/3) happens on every rank.
        """
        leaf = torch.zeros((), device=self.device, requires_grad=True)
        self.policy.backward(leaf * 0.0, scale_wrt_gas=False)  # DeepSpeed wants a grad_fn

    def backward_if_finite(self, loss: torch.Tensor) -> bool:
        """One micro-batch: backward of ``loss`` if it is finite on EVERY rank, then the micro-step.

        Whether the loss is finite is agreed over ranks first (one all-reduce, the one host
        synchronisation per micro-batch), so every rank makes the same calls: ``backward(loss)``
        when all are finite, else ``backward_nothing()`` on all ranks (this micro-batch's gradient
        is left out everywhere). Then ``micro_step``: at the accumulation boundary the optimizer
        steps if any micro-batch since the last boundary was kept, and nothing moves otherwise.
        Returns whether this micro-batch's gradient was kept.
        """
        bad = float(all_reduce_sum(torch.isfinite(loss).logical_not().float()))
        kept = bad == 0
        if kept:
            self.backward(loss)
            self._kept_since_step += 1
        else:
            self.backward_nothing()
        boundary = self.policy.is_gradient_accumulation_boundary()
        self.micro_step(apply_update=self._kept_since_step > 0)
        if boundary:
            self._kept_since_step = 0
        return kept

    def micro_step(self, *, apply_update: bool = True) -> None:
        """Call after every micro-batch backward; the optimizer steps at the accumulation boundary.

        ``apply_update=False`` (at the boundary) means no micro-batch of this optimizer step had a
        finite loss, so there is no gradient: the weights, the optimizer moments and the lr schedule
        are left as they are and only DeepSpeed's micro-step counter advances. (Stepping would crash
        in ZeRO-0's gradient clipping, which has no gradient to clip, or move the weights by Adam
        momentum alone.)
        """
        if not apply_update and self.policy.is_gradient_accumulation_boundary():
            self.policy.micro_steps += 1
            return
        self.policy.step()

    def grad_norm(self) -> float | None:
        norm = self.policy.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    # -- checkpoints ----------------------------------------------------------------------------

    def save_engine_state(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Sharded engine state (weights, optimizer, lr scheduler) for exact resume; collective."""
        self.policy.save_checkpoint(str(directory), tag="engine", client_state=client_state,
                                    save_latest=False)

    def load_engine_state(self, directory: Path) -> dict[str, Any]:
        _, client_state = self.policy.load_checkpoint(
            str(directory), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client_state is None:
            raise RuntimeError(f"could not load the engine state from {directory}/engine")
        return client_state

    def save_hf(self, directory: Path, processor: Any | None = None) -> None:
        """Write the policy as an ordinary Hugging Face folder (collective under ZeRO-3; rank 0 writes)."""
        if self.spec.zero_stage == 3:
            state = self.policy._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        if self.rank == 0:
            module = self.module
            # transformers 5.x records the key renamings it applied at load time and reverts them
            # on save. Its ZeRO-3 load path records extra legacy/prefix renamings whose reversal
            # writes "model.model.layers.*" instead of the checkpoint's "model.layers.*"; saving
            # with none recorded makes it revert the model's default mapping, as a plain load does.
            recorded = getattr(module, "_weight_conversions", None)
            if self.spec.zero_stage == 3:
                module._weight_conversions = None
            try:
                module.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
            finally:
                if self.spec.zero_stage == 3:
                    module._weight_conversions = recorded
            if processor is not None:
                processor.save_pretrained(str(directory))
