"""DeepSpeed engine: the only module of medloc that imports ``deepspeed`` or ``torch.distributed``.

It owns: process-group start-up (gloo on CPU; NCCL on GPU, after ``torch.cuda.set_device(
LOCAL_RANK)``), the collectives the trainers use, the DeepSpeed JSON config built from explicit
arguments, loading the policy (trainable) and the frozen reference model through
``HfDeepSpeedConfig`` + ``from_pretrained`` (building a model inside ``zero.Init`` by constructor
fails on this stack), ``generation_context()`` (gather ZeRO-3 partitions once and remove the
partition hooks while sampling: leaving the hooks on makes generation ~5x slower on CPU),
backward/step with explicit loss scaling, checkpoints (engine state for resume + an ordinary
Hugging Face folder for evaluation), and releasing all of it (``Engine.close`` +
``release_memory``) before evaluation loads its own model.

Collectives (``all_reduce_sum``, ``all_gather_1d``, ``barrier``, ``broadcast_object``): this module
owns the communication device -- cuda:LOCAL_RANK under NCCL, cpu under gloo -- and every call into
``torch.distributed``. A caller hands in a tensor on any device (e.g. CPU float64 statistics); it
is copied to the communication device (``_to_comm``; NCCL has no CPU tensors) and the result comes
back on the caller's device with the caller's dtype. Object collectives pass that device to torch.
With one process the collectives return at once without calling torch.distributed;
``MEDLOC_FORCE_COLLECTIVES=1`` in the environment turns that shortcut off, so that one GPU really
runs every collective through NCCL (a one-GPU check of the multi-GPU path).

Loss scaling contract (see ``Engine.backward``): the trainer hands in micro-batch losses that are
already normalised by a GLOBAL count (tokens or sequences over all micro-batches of all ranks), so
the per-step gradient is the SUM of micro-batch gradients over ranks. DeepSpeed by default divides
by the accumulation steps and averages over data-parallel ranks; both are undone here.

``engine.offload_optimizer=true`` steps the optimizer with DeepSpeed's CPU Adam, compiled on first
use (~1-2 min); ``check_cpu_adam`` checks before anything loads that it is built or can be built,
and says what is missing otherwise.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import socket
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from medloc.logging import console

Precision = Literal["fp32", "bf16"]


# ---------------------------------------------------------------------------------------------
# process group and collectives
# ---------------------------------------------------------------------------------------------

FORCE_COLLECTIVES_ENV = "MEDLOC_FORCE_COLLECTIVES"
Backend = Literal["nccl", "gloo"]

# This process's communication device: cuda:LOCAL_RANK under NCCL, cpu under gloo. Set once by
# init_distributed (None before); every tensor a collective sees is on it (_to_comm).
_COMM_DEVICE: torch.device | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> Backend:
    """NCCL when a GPU is present, else gloo (NCCL has no CPU tensors; gloo no point on a GPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _bind_device(backend: str, local_rank: int) -> torch.device:
    """This process's communication device; under NCCL it also becomes the current CUDA device.

    Called before the process group starts: NCCL stages object collectives and barriers on the
    current device, which is cuda:0 on every rank until ``set_device`` says otherwise.
    """
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if backend == "gloo":
        return torch.device("cpu")
    raise ValueError(f"process group backend {backend!r}: expected 'nccl' or 'gloo'")


def init_distributed() -> tuple[int, int]:
    """Start the process group once; return (rank, world_size).

    Under ``torchrun`` / the ``deepspeed`` launcher the rendezvous variables are set; a plain
    ``python -m medloc.train`` gets a one-process group on a free local port. NCCL on a GPU
    (``torch.cuda.set_device(LOCAL_RANK)`` first), gloo on a CPU.
    """
    global _COMM_DEVICE
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = _backend()
        _COMM_DEVICE = _bind_device(backend, int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=backend)
        _use_current_collectives()
    elif _COMM_DEVICE is None:  # a group someone else started (e.g. a launcher's own code)
        backend = "nccl" if "nccl" in str(dist.get_backend()) else "gloo"
        _COMM_DEVICE = _bind_device(backend, int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _use_current_collectives() -> None:
    """Point DeepSpeed's ZeRO-3 gather / reduce-scatter at torch's current names.

    DeepSpeed 0.19.8 calls ``torch.distributed.all_gather_into_tensor`` and
    ``reduce_scatter_tensor``, which torch 2.14 deprecates with a FutureWarning on every call
    (twice per step under ZeRO-3). ``all_gather_single`` / ``reduce_scatter_single`` are the same
    collectives under their new names, with the same arguments; older torch keeps DeepSpeed's own
    choice.
    """
    from deepspeed.comm import comm as ds_comm

    cdb = getattr(ds_comm, "cdb", None)
    if cdb is None:
        return
    if getattr(cdb, "all_gather_function", None) is not None and hasattr(dist, "all_gather_single"):
        cdb.all_gather_function = dist.all_gather_single
    if (getattr(cdb, "reduce_scatter_function", None) is not None
            and hasattr(dist, "reduce_scatter_single")):
        cdb.reduce_scatter_function = dist.reduce_scatter_single


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def comm_device() -> torch.device:
    """The device every collective's tensors live on (the process group must have started)."""
    if _COMM_DEVICE is None:
        raise RuntimeError("no communication device yet: call medloc.engine.init_distributed() first")
    return _COMM_DEVICE


def _collectives_run() -> bool:
    """Whether a collective calls torch.distributed: more than one process, or the shortcut of
    one process turned off with MEDLOC_FORCE_COLLECTIVES=1 (so one GPU really runs NCCL)."""
    if not dist.is_initialized():
        return False
    return dist.get_world_size() > 1 or os.environ.get(FORCE_COLLECTIVES_ENV, "0") == "1"


def _to_comm(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` on the communication device: what a collective may be handed."""
    return t.detach().to(comm_device(), copy=True).contiguous()


def _comm_empty_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer like ``t`` (already on the communication device) for a result."""
    return torch.empty_like(t, device=comm_device())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy on one process). Returns a new tensor on ``t``'s device,
    with ``t``'s dtype; any device may come in (the sum runs on the communication device)."""
    if not _collectives_run():
        return t.detach().clone()
    out = _to_comm(t)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_gather_1d(t: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of equal length from every rank, in rank order, on ``t``'s device:
    [n] per rank -> [world * n]."""
    if not _collectives_run():
        return t.detach().contiguous().clone()
    src = _to_comm(t)  # [n]
    parts = [_comm_empty_like(src) for _ in range(dist.get_world_size())]  # world x [n]
    dist.all_gather(parts, src)
    return torch.cat(parts).to(t.device)  # [world * n]


def barrier() -> None:
    """Wait for every rank (on the communication device: NCCL's barrier is an all-reduce)."""
    if not _collectives_run():
        return
    dev = comm_device()
    if dev.type == "cuda":
        dist.barrier(device_ids=[dev.index])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (e.g. the run directory); the pickled
    bytes travel on the communication device."""
    if not _collectives_run():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def _params_to_release_cache() -> Any:
    """The ``functools.lru_cache`` behind DeepSpeed's
    ``PartitionedParameterCoordinator.__params_to_release`` (under its NVTX wrapper, which keeps
    the cached function in a closure). Raises if DeepSpeed no longer has it there, so an upgrade
    that moves it is noticed rather than leaking silently."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator as Coordinator,
    )

    fn = Coordinator.__dict__["_PartitionedParameterCoordinator__params_to_release"]
    for candidate in [fn, *(c.cell_contents for c in fn.__closure__ or ())]:
        if hasattr(candidate, "cache_clear"):
            return candidate
    raise RuntimeError("DeepSpeed's PartitionedParameterCoordinator.__params_to_release has no "
                       "lru_cache where medloc.engine expects it (DeepSpeed upgraded?): "
                       "Engine.close cannot release the ZeRO-3 model")


def release_memory() -> None:
    """Free what dropped objects held: a garbage collection (DeepSpeed's engines and hooks sit in
    reference cycles) and, on a GPU, the CUDA caching allocator's free blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        # overlap_comm and stage3_param_persistence_threshold are DeepSpeed's defaults under
        # ZeRO-3 (overlap on; parameters under 1e5 elements -- norms, biases -- kept whole on every
        # rank instead of one all-gather each per forward and backward).
        zero.update(
            {
                "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True,
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
# DeepSpeed's CPU Adam (engine.offload_optimizer=true)
# ---------------------------------------------------------------------------------------------

CpuAdamState = Literal["installed", "loaded", "cached", "build"]


def cpu_adam_missing(builder: Any, *, cuda: bool) -> list[str]:
    """What building DeepSpeed's CPU Adam op (``builder``, a ``CPUAdamBuilder``) needs and this
    machine lacks, each with how to get it; empty when it can be built.

    DeepSpeed 0.19 builds it as a plain C++ extension on every accelerator (the CUDA accelerator
    hands out the CPU builder): a C++ compiler with OpenMP, ninja and the Python headers. A
    DeepSpeed whose builder is a CUDA op builder also needs nvcc (``cuda``: a GPU is present).
    """
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder
    from torch.utils import cpp_extension

    missing = []
    if not builder.is_compatible(False):
        reason = getattr(builder, "error_log", None) or "no reason given"
        missing.append(f"DeepSpeed's {builder.name} op says it is not compatible with this machine "
                       f"({reason})")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} is not on PATH; e.g. apt-get install g++)")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        missing.append(f"the Python headers ({header} does not exist; e.g. apt-get install "
                       f"python{sys.version_info.major}.{sys.version_info.minor}-dev)")
    if cuda and isinstance(builder, CUDAOpBuilder):
        home = cpp_extension.CUDA_HOME
        if home is None or not (Path(home) / "bin" / "nvcc").is_file():
            missing.append(f"a CUDA toolkit matching torch's CUDA {torch.version.cuda} "
                           f"(CUDA_HOME={home!r} has no bin/nvcc)")
    return missing


def check_cpu_adam(builder: Any | None = None) -> CpuAdamState:
    """Whether DeepSpeed's CPU Adam can be used, checked before anything is loaded.

    Returns "installed" (pre-built into DeepSpeed, ``DS_BUILD_CPU_ADAM=1``), "loaded" (already in
    this process), "cached" (built by an earlier run: torch's extension folder holds it) or "build"
    (the first use compiles it, ~1-2 min). Raises RuntimeError naming engine.offload_optimizer,
    what is missing and what to do when it can be neither loaded nor built.
    """
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils import cpp_extension

    builder = CPUAdamBuilder() if builder is None else builder
    if installed_ops.get(builder.name, False):
        return "installed"
    if builder.name in OpBuilder._loaded_ops:
        return "loaded"
    missing = cpu_adam_missing(builder, cuda=torch.cuda.is_available())
    if missing:
        raise RuntimeError(
            "engine.offload_optimizer=true steps the optimizer with DeepSpeed's CPU Adam "
            "(DeepSpeedCPUAdam), which DeepSpeed compiles on first use, and it cannot be built "
            "here: missing " + "; ".join(missing) + ". Install what is missing, or install "
            "DeepSpeed with the op built in (DS_BUILD_CPU_ADAM=1 pip install --no-cache-dir "
            f"deepspeed=={deepspeed.__version__}), or choose an engine without optimizer offload "
            "(engine=zero3 or engine=zero2: engine.offload_optimizer=false)."
        )
    # torch's JIT build folder of this op (the private helper creates it if absent: harmless).
    folder = Path(cpp_extension._get_build_directory(builder.name, verbose=False))
    return "cached" if (folder / f"{builder.name}.so").is_file() else "build"


def prepare_cpu_adam(*, announce: bool, builder: Any | None = None) -> CpuAdamState:
    """``check_cpu_adam``, and one console line (``announce``: rank 0) when the first use is
    about to compile the op, so that the ~1-2 min build does not look like a hung run."""
    state = check_cpu_adam(builder)
    if state == "build" and announce:
        console("[engine] building DeepSpeed's CPU Adam once (engine.offload_optimizer=true), "
                "~1-2 min; later runs reuse it")
    return state


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
    # LoRA adapters on a frozen base (medloc.models.lora.LoraSpec); None trains every parameter.
    lora: Any = None


def _torch_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


class Engine:
    """Policy (+ optional frozen reference) under DeepSpeed, with the few verbs the trainers use."""

    def __init__(self, spec: EngineSpec):
        from medloc.models.loading import (
            disable_dropout,
            enable_checkpointing,
            freeze_vision_tower,
            load_model,
        )
        from medloc.models.lora import AdaptersOff, add_lora

        self.spec = spec
        self.rank, self.world_size = init_distributed()
        self.device = device()
        if spec.offload_optimizer:
            prepare_cpu_adam(announce=self.rank == 0)
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
        # peft=lora: adapters injected in place, every base parameter frozen (its LoraConfig).
        self.lora = None if spec.lora is None else add_lora(
            model, spec.lora, base_model=str(Path(spec.model_path).resolve()))
        if spec.gradient_checkpointing:
            enable_checkpointing(model)
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
        self._hf_ds_ref_config = None
        if spec.with_reference and self.lora is not None:
            # LoRA: the reference is the policy with its adapters off; no second model.
            self.reference = AdaptersOff(self.module)
        elif spec.with_reference:
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

    def close(self) -> None:
        """Release the policy, its optimizer and lr schedule, the reference and DeepSpeed's hooks
        on them (ZeRO-3: the partition hooks and parameter stack), so that ``release_memory()``
        can free them; the engine cannot be used afterwards. Call on every rank."""
        from deepspeed.runtime.zero import parameter_offload

        ours = []
        for engine in (self.policy, self.reference):
            if isinstance(engine, deepspeed.DeepSpeedEngine):
                engine.destroy()
                ours.append(engine.module)
        # ZeRO-3 pushes each engine's top module onto this module-level stack at set-up and never
        # pops it: left there, it would keep the whole model alive.
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if not any(m is o for o in ours)]
        # ZeRO-3's parameter coordinator memoises which parameters to release after each module
        # in a class-level, unbounded lru_cache keyed by (coordinator, module, step): it keeps
        # every traced module alive once a forward has replayed a complete trace (the
        # shared-prefix update's two forwards per micro-batch do).
        if self.spec.zero_stage == 3:
            _params_to_release_cache().cache_clear()
        self.policy = self.optimizer = self.lr_scheduler = self.reference = None
        # transformers finds ZeRO-3 through a weak reference to the live HfDeepSpeedConfig: once
        # these are gone, a later from_pretrained (evaluation) loads an ordinary model.
        self._hf_ds_config = self._hf_ds_ref_config = None

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
            from deepspeed.runtime.zero import parameter_offload

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
                    depth = len(parameter_offload.FWD_MODULE_STACK)
                    offload.setup_zero_stage3_hooks()
                    # it pushes the top module again (once per step otherwise); it is there already
                    del parameter_offload.FWD_MODULE_STACK[depth:]
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
        # LoRA: the frozen base is left out (it is the model folder's); adapters + their optimizer.
        self.policy.save_checkpoint(str(directory), tag="engine", client_state=client_state,
                                    save_latest=False, exclude_frozen_parameters=self.lora is not None)

    def load_engine_state(self, directory: Path) -> dict[str, Any]:
        _, client_state = self.policy.load_checkpoint(
            str(directory), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True,
            custom_load_fn=None if self.lora is None else _load_adapters_only,
        )
        if client_state is None:
            raise RuntimeError(f"could not load the engine state from {directory}/engine")
        return client_state

    def save_hf(self, directory: Path, processor: Any | None = None) -> None:
        """Write the policy as an ordinary Hugging Face folder (collective under ZeRO-3; rank 0 writes).

        LoRA: the folder holds the merged weights (W + scale * B @ A) and ``directory/adapter``
        the adapter (medloc.models.lora)."""
        from medloc.models.lora import lora_scale, merged_state, save_adapter

        if self.spec.zero_stage == 3:
            state = self.policy._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        if self.rank == 0:
            if self.lora is not None:
                save_adapter(Path(directory) / "adapter", state, self.lora)
                state = merged_state(state, lora_scale(self.lora.r, self.lora.lora_alpha))
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

    def save_adapter(self, directory: Path) -> None:
        """LoRA: write the adapter alone in peft's format (checkpoints; collective under ZeRO-3,
        rank 0 writes)."""
        from medloc.models.lora import is_adapter_key, save_adapter

        if self.lora is None:
            raise RuntimeError("save_adapter: this engine trains every parameter (peft=none)")
        if self.spec.zero_stage == 3:
            state = self.policy._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        else:
            state = {k: v for k, v in self.module.state_dict().items() if is_adapter_key(k)}
        if self.rank == 0:
            save_adapter(directory, state, self.lora)


def _load_adapters_only(src: dict[str, Any], dst: torch.nn.Module) -> None:
    """Load a LoRA engine checkpoint's module state (saved without the frozen base) into ``dst``:
    every trainable parameter must be in it and nothing else may be."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"LoRA engine checkpoint does not fit the model: missing {missing[:4]}, "
                           f"unexpected {sorted(result.unexpected_keys)[:4]}")
